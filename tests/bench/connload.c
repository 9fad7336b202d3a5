/* Load generator for the agent's new-connection benchmark (tests/bench/test_agent_bench.py).
 *
 * connload serve PORT
 *     accept and close IPv4 TCP connections forever (one thread, blocking).
 * connload connect HOST PORT COUNT
 *     COUNT sequential connect + close (SO_LINGER 0: an RST, no TIME_WAIT), each connect bounded
 *     by a 200 ms timeout; prints one line:
 *       ok failed wall_ns cpu_ns connect_p50_ns connect_p90_ns
 *     cpu_ns is this process's CPU time (CLOCK_PROCESS_CPUTIME_ID). On a veth the server's
 *     receive path (netfilter hooks included) runs as softirq work in the sender's context and,
 *     without CONFIG_IRQ_TIME_ACCOUNTING, is charged to it: cpu_ns per connection is the kernel's
 *     cost of the handshake, largely immune to other processes competing for the CPU.
 *
 * Lab addresses only; bounded by COUNT and the timeout.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static int64_t now_ns(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static int serve(int port) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = htonl(INADDR_ANY)};
    if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof a) < 0 || listen(s, 4096) < 0) {
        perror("serve");
        return 1;
    }
    printf("ready\n");
    fflush(stdout);
    for (;;) {
        int c = accept(s, NULL, NULL);
        if (c >= 0)
            close(c);
        else if (errno != EINTR && errno != ECONNABORTED)
            usleep(1000);
    }
}

static int connect_loop(const char *host, int port, long count) {
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (inet_pton(AF_INET, host, &a.sin_addr) != 1 || count <= 0) {
        fprintf(stderr, "bad address or count\n");
        return 2;
    }
    int64_t *lat = calloc((size_t)count, sizeof *lat);
    if (!lat)
        return 2;
    struct linger lg = {.l_onoff = 1, .l_linger = 0};
    struct timeval timeout = {.tv_sec = 0, .tv_usec = 200000};
    long ok = 0, failed = 0;
    int64_t wall0 = now_ns(CLOCK_MONOTONIC), cpu0 = now_ns(CLOCK_PROCESS_CPUTIME_ID);
    for (long i = 0; i < count; i++) {
        int s = socket(AF_INET, SOCK_STREAM, 0);
        if (s < 0) {
            perror("socket");
            return 2;
        }
        setsockopt(s, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
        setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof timeout);  /* bounds connect() */
        int64_t t0 = now_ns(CLOCK_MONOTONIC);
        if (connect(s, (struct sockaddr *)&a, sizeof a) == 0)
            lat[ok++] = now_ns(CLOCK_MONOTONIC) - t0;
        else
            failed++;
        close(s);
    }
    int64_t cpu = now_ns(CLOCK_PROCESS_CPUTIME_ID) - cpu0, wall = now_ns(CLOCK_MONOTONIC) - wall0;
    qsort(lat, (size_t)ok, sizeof *lat, cmp_i64);
    printf("%ld %ld %lld %lld %lld %lld\n", ok, failed, (long long)wall, (long long)cpu,
           (long long)(ok ? lat[ok / 2] : 0), (long long)(ok ? lat[ok * 9 / 10] : 0));
    free(lat);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "serve") == 0)
        return serve(atoi(argv[2]));
    if (argc == 5 && strcmp(argv[1], "connect") == 0)
        return connect_loop(argv[2], atoi(argv[3]), atol(argv[4]));
    fprintf(stderr, "usage: connload serve PORT | connload connect HOST PORT COUNT\n");
    return 2;
}
