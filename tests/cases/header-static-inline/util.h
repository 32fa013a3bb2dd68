#ifndef UTIL_H
#define UTIL_H

static inline int clampv(int v)
{
	return v < 0 ? 0 : v > 100 ? 100 : v;
}

#endif
