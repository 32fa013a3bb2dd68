#include <stdio.h>
#include "session.h"

int main(void)
{
	struct session s = { 0 };

	s.flags = 1;
	printf("%d\n", session_active(&s));
	return 0;
}
