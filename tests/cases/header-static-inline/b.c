#include "util.h"

int fb(int x)
{
	return clampv(x * 2);
}
