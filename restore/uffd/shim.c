#include "ur_shim.c"
#include "ur_spawn.c"
