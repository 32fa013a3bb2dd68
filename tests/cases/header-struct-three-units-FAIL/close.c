#include "conn.h"

int conn_close(struct conn *c)
{
	c->state = 0;
	return c->fd;
}
