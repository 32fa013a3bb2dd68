#include <assert.h>

int adjust(int v)
{
	return v + 1;
}

int checked_div(int a, int b)
{
	assert(b != 0);
	return a / b;
}
