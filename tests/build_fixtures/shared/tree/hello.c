#include <stdio.h>
#include "greet.h"

int main(void)
{
	puts(greeting(0));
	return 0;
}
