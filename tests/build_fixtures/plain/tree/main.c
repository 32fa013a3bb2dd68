#include <stdio.h>
#include "util.h"

int main(void)
{
	printf("%d\n", offset(scale(20)));
	return 0;
}
