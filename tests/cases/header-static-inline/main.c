#include <stdio.h>

int fa(int x);
int fb(int x);
int fc(int x);

int main(void)
{
	printf("%d %d %d\n", fa(150), fb(70), fc(3));
	return 0;
}
