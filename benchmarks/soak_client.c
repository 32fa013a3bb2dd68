/* Open-loop connection-churn client for benchmarks/bench_soak.py --rate.
 *
 * N threads; each sends one request every 1/RATE seconds on a fixed schedule: connect,
 * "PING\n", read "PONG\n", close. A request's latency is measured from the moment it was
 * SCHEDULED, not from when the thread got round to sending it: a stall of the server
 * (a stopped thread) delays the requests queued behind it, and each of them counts it
 * (no coordinated omission). Unlike the closed-loop Python clients this leaves the CPUs
 * mostly idle, so what the patcher adds is not hidden under CPU contention.
 *
 * MODE (optional) says what a request is:
 *   line   (default, examples/kvserver) as above;
 *   redis  RESP, the redis protocol: "SET soak:<thread> <n>" and "GET soak:<thread>" sent
 *          together, the answer must be "+OK" and exactly <n> (a wrong value is a failed
 *          request, not only a missing one). Even threads connect and close per request
 *          (accept and connection set-up in the server every time); odd threads keep one
 *          connection open (reopened after a failure), as most redis clients do -- redis is
 *          one event loop, so a stopped main thread delays both kinds alike.
 *
 * usage: soak_client PORT THREADS RATE OUTFILE [line|redis]
 * Runs until stdin closes; then writes one line per request to OUTFILE:
 *   <scheduled CLOCK_MONOTONIC ns> <latency ns> <0 ok | errno or -1 bad reply>
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

struct sample { int64_t at, dt; int err; };
struct worker { pthread_t th; int id; struct sample *s; size_t n, cap; };

static int port;
static double rate;
static int redis_mode;
static atomic_int stop;

static int64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int connect_server(void)
{
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
	struct timeval tv = { .tv_sec = 5 };

	if (fd < 0)
		return -1;
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
	if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
		int e = errno;
		close(fd);
		errno = e;
		return -1;
	}
	return fd;
}

/* Send req, read exactly strlen(want) bytes, compare: 0, an errno, or -1 (a wrong answer). */
static int exchange(int fd, const char *req, const char *want)
{
	size_t n = strlen(req), len = strlen(want);
	char buf[128];
	ssize_t got = 0, r = 0;

	errno = 0;
	if (send(fd, req, n, MSG_NOSIGNAL) != (ssize_t)n)
		return errno ? errno : EIO;
	while ((size_t)got < len && (r = read(fd, buf + got, len - got)) > 0)
		got += r;
	if (r < 0)
		return errno;
	if ((size_t)got != len || memcmp(buf, want, len) != 0)
		return -1;
	return 0;
}

static int one_request(void)
{
	int fd = connect_server(), err;

	if (fd < 0)
		return errno;
	err = exchange(fd, "PING\n", "PONG\n");
	close(fd);
	return err;
}

/* One redis request of thread `id` (see the header); *conn is its open connection or -1. */
static int one_redis_request(int id, int64_t seq, int persistent, int *conn)
{
	char key[32], val[32], req[160], want[64];
	int kl = snprintf(key, sizeof key, "soak:%d", id);
	int vl = snprintf(val, sizeof val, "%lld", (long long)seq);
	int err;

	snprintf(req, sizeof req,
		 "*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n"
		 "*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n",
		 kl, key, vl, val, kl, key);
	snprintf(want, sizeof want, "+OK\r\n$%d\r\n%s\r\n", vl, val);
	if (*conn < 0 && (*conn = connect_server()) < 0)
		return errno;
	err = exchange(*conn, req, want);
	if (err || !persistent) {
		close(*conn);
		*conn = -1;
	}
	return err;
}

static void *run(void *arg)
{
	struct worker *w = arg;
	int64_t period = (int64_t)(1e9 / rate), next = now_ns(), seq = 0;
	int conn = -1;

	while (!atomic_load(&stop)) {
		int64_t t = now_ns();
		if (t < next) {
			struct timespec ts = { .tv_sec = next / 1000000000, .tv_nsec = next % 1000000000 };
			clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
		}
		int err = redis_mode ? one_redis_request(w->id, ++seq, w->id % 2, &conn)
				     : one_request();
		if (w->n == w->cap) {
			w->cap = w->cap ? 2 * w->cap : 65536;
			w->s = realloc(w->s, w->cap * sizeof *w->s);
			if (!w->s)
				abort();
		}
		w->s[w->n++] = (struct sample){ next, now_ns() - next, err };
		next += period;
	}
	if (conn >= 0)
		close(conn);
	return NULL;
}

int main(int argc, char **argv)
{
	if (argc < 5 || argc > 6 || (argc == 6 && strcmp(argv[5], "line") != 0 &&
					strcmp(argv[5], "redis") != 0)) {
		fprintf(stderr, "usage: %s PORT THREADS RATE OUTFILE [line|redis]\n", argv[0]);
		return 2;
	}
	redis_mode = argc == 6 && strcmp(argv[5], "redis") == 0;
	port = atoi(argv[1]);
	int n = atoi(argv[2]);
	rate = atof(argv[3]);
	struct worker *w = calloc(n, sizeof *w);
	for (int i = 0; i < n; i++) {
		w[i].id = i;
		pthread_create(&w[i].th, NULL, run, &w[i]);
	}
	char c;
	while (read(0, &c, 1) > 0)
		;
	atomic_store(&stop, 1);
	FILE *out = fopen(argv[4], "w");
	if (!out)
		return 1;
	for (int i = 0; i < n; i++) {
		pthread_join(w[i].th, NULL);
		for (size_t k = 0; k < w[i].n; k++)
			fprintf(out, "%lld %lld %d\n", (long long)w[i].s[k].at,
				(long long)w[i].s[k].dt, w[i].s[k].err);
	}
	return fclose(out) != 0;
}
