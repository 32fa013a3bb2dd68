#include <stdio.h>

unsigned checksum(const unsigned char *p, unsigned n);

int main(void)
{
	printf("client %u\n", checksum((const unsigned char *)"client", 6));
	return 0;
}
