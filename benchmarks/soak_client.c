/* Open-loop connection-churn client for benchmarks/bench_soak.py --rate.
 *
 * N threads; each sends one request every 1/RATE seconds on a fixed schedule: connect,
 * "PING\n", read "PONG\n", close. A request's latency is measured from the moment it was
 * SCHEDULED, not from when the thread got round to sending it: a stall of the server
 * (a stopped thread) delays the requests queued behind it, and each of them counts it
 * (no coordinated omission). Unlike the closed-loop Python clients this leaves the CPUs
 * mostly idle, so what the patcher adds is not hidden under CPU contention.
 *
 * usage: soak_client PORT THREADS RATE OUTFILE
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
struct worker { pthread_t th; struct sample *s; size_t n, cap; };

static int port;
static double rate;
static atomic_int stop;

static int64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int one_request(void)
{
	int fd = socket(AF_INET, SOCK_STREAM, 0), err = 0;
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
	struct timeval tv = { .tv_sec = 5 };
	char buf[16];
	ssize_t got = 0, r;

	if (fd < 0)
		return errno;
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
	if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0 || write(fd, "PING\n", 5) != 5) {
		err = errno ? errno : EIO;
		goto out;
	}
	while (got < 5 && (r = read(fd, buf + got, sizeof buf - got)) > 0)
		got += r;
	if (got != 5 || memcmp(buf, "PONG\n", 5) != 0)
		err = got < 0 ? errno : -1;
out:
	close(fd);
	return err;
}

static void *run(void *arg)
{
	struct worker *w = arg;
	int64_t period = (int64_t)(1e9 / rate), next = now_ns();

	while (!atomic_load(&stop)) {
		int64_t t = now_ns();
		if (t < next) {
			struct timespec ts = { .tv_sec = next / 1000000000, .tv_nsec = next % 1000000000 };
			clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
		}
		int err = one_request();
		if (w->n == w->cap) {
			w->cap = w->cap ? 2 * w->cap : 65536;
			w->s = realloc(w->s, w->cap * sizeof *w->s);
			if (!w->s)
				abort();
		}
		w->s[w->n++] = (struct sample){ next, now_ns() - next, err };
		next += period;
	}
	return NULL;
}

int main(int argc, char **argv)
{
	if (argc != 5) {
		fprintf(stderr, "usage: %s PORT THREADS RATE OUTFILE\n", argv[0]);
		return 2;
	}
	port = atoi(argv[1]);
	int n = atoi(argv[2]);
	rate = atof(argv[3]);
	struct worker *w = calloc(n, sizeof *w);
	for (int i = 0; i < n; i++)
		pthread_create(&w[i].th, NULL, run, &w[i]);
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
