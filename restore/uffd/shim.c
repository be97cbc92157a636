#include "ur_shim.c"
