#include "kvggml.h"

#define KVGGML_STR2(x) #x
#define KVGGML_STR(x) KVGGML_STR2(x)

const char * kvggml_version_string(void) {
    return KVGGML_STR(KVGGML_VERSION_MAJOR) "." KVGGML_STR(KVGGML_VERSION_MINOR) "." KVGGML_STR(KVGGML_VERSION_PATCH);
}

unsigned kvggml_version_number(void) {
    return KVGGML_VERSION_NUMBER;
}
