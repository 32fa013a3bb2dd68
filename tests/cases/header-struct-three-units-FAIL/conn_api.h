#ifndef CONN_API_H
#define CONN_API_H

/* what main.c sees: struct conn stays opaque to it */
struct conn;

struct conn *conn_open(int fd);
long conn_count(struct conn *c, long n);
int conn_close(struct conn *c);

#endif
