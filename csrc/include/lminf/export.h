// Symbol visibility: the shared library exports the public API and nothing else.
#pragma once

#if defined(_WIN32)
#define LMINF_API
#else
#define LMINF_API __attribute__((visibility("default")))
#endif
