// Library-level entry points.
#include "common.cuh"

// The message of a cudaError_t code returned by an op.
FM_API const char* fm_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }
