#include <stdlib.h>
#include "conn.h"

struct conn *conn_last;

struct conn *conn_open(int fd)
{
	struct conn *c = calloc(1, sizeof(*c));

	if (c) {
		c->fd = fd;
		c->state = 1;
		conn_last = c;
	}
	return c;
}
