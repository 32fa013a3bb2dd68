#include <stdio.h>

int sum_ports(const int *v, int n);

void report_error(const char *what, int v)
{
	fprintf(stderr, "error: %s %d\n", what, v);
}

int main(void)
{
	static const int ports[] = { 22, 80, 443 };

	printf("%d\n", sum_ports(ports, 3));
	return 0;
}
