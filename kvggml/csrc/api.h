// What the C API's source files share (api.cpp, report.cpp).
#pragma once

#include <cstdint>
#include <string>

namespace kvggml {

// KVGGML_ERROR_ARGUMENT, with its message kept for kvggml_last_error().
int32_t argument_error(const std::string & message);

} // namespace kvggml
