#include <stdio.h>

void greet(const char *who)
{
	printf("hello, %s!\n", who);
}

void farewell(const char *who)
{
	printf("goodbye, %s.\n", who);
}
