// Library version, kept in step with python/lm_infinite/_version.py (a test checks).
#pragma once

#define LMINF_VERSION_MAJOR 0
#define LMINF_VERSION_MINOR 1
#define LMINF_VERSION_PATCH 0
#define LMINF_VERSION "0.1.0"
