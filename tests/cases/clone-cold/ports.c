#include <stdio.h>
#include <stdlib.h>

extern void report_error(const char *what, int v) __attribute__((cold));

/* The error path calls a cold function and exit(): gcc -O2 (-freorder-blocks-and-partition)
 * moves it into .text.unlikely as the fragment sum_ports.cold. */
int sum_ports(const int *v, int n)
{
	int total = 0;

	for (int i = 0; i < n; i++) {
		if (v[i] < 0 || v[i] > 65535) {
			report_error("port", v[i]);
			fprintf(stderr, "bad port %d at %d\n", v[i], i);
			exit(2);
		}
		total += v[i];
	}
	return total;
}
