#include <stdio.h>

static const char *greeting(void)
{
	return "hello";
}

int main(void)
{
	puts(greeting());
	return 0;
}
