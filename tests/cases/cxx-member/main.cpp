#include <cstdio>
#include "counter.hpp"

int main()
{
	Counter c;

	c.bump(2);
	std::printf("%d\n", c.bump(3));
	return 0;
}
