#include <stdio.h>

unsigned checksum(const unsigned char *p, unsigned n);

int main(void)
{
	printf("server %u\n", checksum((const unsigned char *)"server", 6));
	return 0;
}
