// kvggml: wavelet compression of the llama.cpp KV cache.
//
// The one public header of the C side. Everything here is exported by the
// patched libllama; the stock library has none of these symbols, which is how
// the Python layer tells the two apart.
#pragma once

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#    define KVGGML_API __declspec(dllexport)
#else
#    define KVGGML_API __attribute__((visibility("default")))
#endif

#define KVGGML_VERSION_MAJOR 0
#define KVGGML_VERSION_MINOR 1
#define KVGGML_VERSION_PATCH 0
#define KVGGML_VERSION_NUMBER (KVGGML_VERSION_MAJOR * 10000 + KVGGML_VERSION_MINOR * 100 + KVGGML_VERSION_PATCH)

// Version of the compression code compiled into this library, e.g. "0.1.0".
KVGGML_API const char * kvggml_version_string(void);
// The same as KVGGML_VERSION_NUMBER, for checking header/library agreement at run time.
KVGGML_API unsigned kvggml_version_number(void);

#ifdef __cplusplus
}
#endif
