#include <stdio.h>
#include "loud.h"

int main(void)
{
	printf("%d\n", loudness(3));
	return 0;
}
