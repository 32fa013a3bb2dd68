#include <stdio.h>
#include "conn_api.h"

int main(void)
{
	struct conn *c = conn_open(3);

	printf("%ld\n", conn_count(c, 5));
	printf("%d\n", conn_close(c));
	return 0;
}
