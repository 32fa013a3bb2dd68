#include <stdio.h>
#include "lib/ops.h"

int main(void)
{
	printf("%d\n", add(mul(6, 7), 0));
	return 0;
}
