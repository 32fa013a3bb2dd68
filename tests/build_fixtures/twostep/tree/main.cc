#include <cstdio>

extern "C" int calc(int x);

int main()
{
	std::printf("%d\n", calc(4));
	return 0;
}
