#include "util.h"

/* Includes util.h but does not use clampv(). */
int fc(int x)
{
	return x - 1;
}
