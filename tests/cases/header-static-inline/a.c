#include "util.h"

int fa(int x)
{
	return clampv(x) + 1;
}
