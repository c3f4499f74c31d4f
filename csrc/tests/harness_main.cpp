#include "harness.h"

int main() { return lminf_test::run_all(); }
