#include <stdio.h>

#define LOG(msg) fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, msg)

int parse_flag(const char *s)
{
	if (s[0] != '-') {
		LOG("not a flag");
		return -1;
	}
	return s[1];
}
