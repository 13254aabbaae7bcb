#ifndef EXACTLY_ONCE_CHIREDIS_SHIM_H
#define EXACTLY_ONCE_CHIREDIS_SHIM_H

#include <hiredis/hiredis.h>

#endif
