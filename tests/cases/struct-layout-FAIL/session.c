#include "session.h"

int session_active(const struct session *s)
{
	return s->flags & 1;
}
