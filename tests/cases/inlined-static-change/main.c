#include <stdio.h>

int area(int w, int h);
int volume(int w, int h, int d);
int perimeter(int w, int h);

int main(void)
{
	printf("%d %d %d\n", area(2, 3), volume(2, 3, 4), perimeter(2, 3));
	return 0;
}
