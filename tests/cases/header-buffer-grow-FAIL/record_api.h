#ifndef RECORD_API_H
#define RECORD_API_H

struct record;

int record_id(const struct record *r);
char record_initial(const struct record *r);

#endif
