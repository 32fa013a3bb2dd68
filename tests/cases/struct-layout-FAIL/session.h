#ifndef SESSION_H
#define SESSION_H

struct session {
	int id;
	int flags;
};

int session_active(const struct session *s);

#endif
