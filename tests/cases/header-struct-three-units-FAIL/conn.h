#ifndef CONN_H
#define CONN_H

#include "conn_api.h"

struct conn {
	int fd;
	int state;
	long bytes;
};

#endif
