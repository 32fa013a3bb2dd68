#ifndef RECORD_H
#define RECORD_H

#define NAME_LEN 16

struct record {
	int id;
	char name[NAME_LEN];
};

#endif
