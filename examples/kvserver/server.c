/*
 * kvserver: a small multi-threaded key-value server on loopback, the demo target of livesplice.
 *
 * One thread per connection. Each session has a name and an admin flag; only admins may read
 * the secret. The NAME command has a real memory-safety bug (an out-of-bounds write, CWE-787):
 * set_name() trusts the client's length and copies past the end of session->name into the
 * adjacent admin flag. fix.patch bounds the copy.
 *
 *   usage: kvserver PORT         commands (one per line):
 *     PING                       -> PONG
 *     NAME <len> <bytes>         set the session name (len bytes follow the space)
 *     WHOAMI                     -> name and admin flag
 *     SET <key> <value> / GET <key>
 *     SECRET                     -> the secret, admins only
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define NAME_MAX_LEN 16
#define MAX_KEYS 64

struct session {
	int fd;
	char name[NAME_MAX_LEN];
	int admin;
	unsigned long requests;
};

static const char secret[] = "the launch code is 0000";
static pthread_mutex_t store_lock = PTHREAD_MUTEX_INITIALIZER;
static char keys[MAX_KEYS][32];
static char values[MAX_KEYS][64];
static int nkeys;

static void reply(struct session *s, const char *msg)
{
	size_t len = strlen(msg);
	while (len > 0) {
		ssize_t n = write(s->fd, msg, len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return;
		msg += n;
		len -= (size_t)n;
	}
}

/* The bug: len comes from the client and is never checked against sizeof(s->name). */
static void set_name(struct session *s, const char *arg, size_t len)
{
	memcpy(s->name, arg, len);
	s->name[len < NAME_MAX_LEN ? len : NAME_MAX_LEN - 1] = '\0';
}

static void cmd_ping(struct session *s, char *args, size_t len)
{
	(void)args;
	(void)len;
	reply(s, "PONG\n");
}

static void cmd_name(struct session *s, char *args, size_t arglen)
{
	char *end;
	unsigned long len = strtoul(args, &end, 10);

	if (*end != ' ' || len > arglen - (size_t)(end + 1 - args)) {
		reply(s, "ERR usage: NAME len bytes\n");
		return;
	}
	set_name(s, end + 1, len);
	reply(s, "OK\n");
}

static void cmd_whoami(struct session *s, char *args, size_t len)
{
	char out[96];

	(void)args;
	(void)len;
	snprintf(out, sizeof(out), "NAME %s ADMIN %d\n", s->name, s->admin);
	reply(s, out);
}

static void cmd_set(struct session *s, char *args, size_t len)
{
	/* strtok_r: one connection per thread, and strtok's hidden state is shared by all */
	char *save = NULL;
	char *key = strtok_r(args, " ", &save), *val = strtok_r(NULL, "", &save);
	int i;

	(void)len;
	if (!key || !val) {
		reply(s, "ERR usage: SET key value\n");
		return;
	}
	pthread_mutex_lock(&store_lock);
	for (i = 0; i < nkeys && strcmp(keys[i], key) != 0; i++)
		;
	if (i == nkeys && nkeys < MAX_KEYS)
		nkeys++;
	if (i < MAX_KEYS) {
		snprintf(keys[i], sizeof(keys[i]), "%s", key);
		snprintf(values[i], sizeof(values[i]), "%s", val);
	}
	pthread_mutex_unlock(&store_lock);
	reply(s, i < MAX_KEYS ? "OK\n" : "ERR full\n");
}

static void cmd_get(struct session *s, char *key, size_t len)
{
	char out[96] = "NOTFOUND\n";

	(void)len;
	pthread_mutex_lock(&store_lock);
	for (int i = 0; i < nkeys; i++)
		if (strcmp(keys[i], key) == 0)
			snprintf(out, sizeof(out), "VALUE %s\n", values[i]);
	pthread_mutex_unlock(&store_lock);
	reply(s, out);
}

static void cmd_secret(struct session *s, char *args, size_t len)
{
	char out[96];

	(void)args;
	(void)len;
	if (!s->admin) {
		reply(s, "DENIED\n");
		return;
	}
	snprintf(out, sizeof(out), "SECRET %s\n", secret);
	reply(s, out);
}

struct command {
	const char *name;
	void (*run)(struct session *s, char *args, size_t len);
};

static const struct command commands[] = {
	{ "PING", cmd_ping },	{ "NAME", cmd_name }, { "WHOAMI", cmd_whoami },
	{ "SET", cmd_set },	{ "GET", cmd_get },   { "SECRET", cmd_secret },
};

static void handle_line(struct session *s, char *line, size_t linelen)
{
	size_t n = strcspn(line, " ");

	s->requests++;
	for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++) {
		if (strlen(commands[i].name) == n && strncmp(line, commands[i].name, n) == 0) {
			char *args = line[n] ? line + n + 1 : line + n;
			commands[i].run(s, args, linelen - (size_t)(args - line));
			return;
		}
	}
	reply(s, "ERR unknown command\n");
}

static void *serve(void *arg)
{
	struct session *s = arg;
	char buf[4096];
	size_t used = 0;

	pthread_setname_np(pthread_self(), "kv-conn");
	for (;;) {
		ssize_t n = read(s->fd, buf + used, sizeof(buf) - 1 - used);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		used += (size_t)n;
		char *start = buf, *nl;
		while ((nl = memchr(start, '\n', used - (size_t)(start - buf))) != NULL) {
			*nl = '\0';
			handle_line(s, start, (size_t)(nl - start));
			start = nl + 1;
		}
		used -= (size_t)(start - buf);
		memmove(buf, start, used);
		if (used == sizeof(buf) - 1)
			used = 0; /* line too long: drop it */
	}
	close(s->fd);
	free(s);
	return NULL;
}

int main(int argc, char **argv)
{
	int port = argc > 1 ? atoi(argv[1]) : 7070;
	int ls = socket(AF_INET, SOCK_STREAM, 0), one = 1;
	struct sockaddr_in addr = { .sin_family = AF_INET, .sin_port = htons((unsigned short)port) };

	signal(SIGPIPE, SIG_IGN);
	addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(ls, (struct sockaddr *)&addr, sizeof(addr)) < 0 || listen(ls, 64) < 0) {
		perror("kvserver: bind/listen");
		return 1;
	}
	printf("kvserver: listening on 127.0.0.1:%d pid %d\n", port, (int)getpid());
	fflush(stdout);
	for (;;) {
		int fd = accept(ls, NULL, NULL);
		if (fd < 0) {
			if (errno == EINTR)
				continue;
			perror("kvserver: accept");
			return 1;
		}
		struct session *s = calloc(1, sizeof(*s));
		pthread_t t;
		s->fd = fd;
		strcpy(s->name, "guest");
		if (pthread_create(&t, NULL, serve, s) != 0) {
			close(fd);
			free(s);
			continue;
		}
		pthread_detach(t);
	}
}
