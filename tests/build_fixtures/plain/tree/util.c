#include "util.h"

int scale(int x)
{
	return x * 2;
}

int offset(int x)
{
	return x + 1;
}
