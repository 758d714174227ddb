/*
 * effect_delayline: the delay line of bench/effect, because this kernel has
 * no netem (`tc qdisc add ... netem` fails: "Specified qdisc kind is
 * unknown", and there is no veth either).
 *
 * It creates one TUN device in each of two network namespaces (it setns()es
 * into each before TUNSETIFF: a TUN device lives in the namespace of the
 * process that made it) and moves every IP packet from one to the other,
 * holding each for a fixed one-way delay and dropping a given fraction at
 * random. The devices are not persistent: they vanish when this exits.
 *
 *   effect_delayline --ns-a /run/netns/A --dev-a NAME --ns-b /run/netns/B --dev-b NAME
 *                    [--delay-us N] [--loss F] [--rate-mbit R] [--buffer-bytes B]
 *                    [--queue N] [--max-seconds S] [--max-bytes B] [--seed N]
 *
 * Per direction the queue is a FIFO of --queue packet slots (2 KiB each,
 * allocated lazily by the kernel as they are first touched): a packet that
 * arrives when its direction's queue is full is dropped and counted
 * (`full`), as a router with a full buffer would. The queue holds every
 * packet for the whole delay, so it must hold rate x one-way delay; the size
 * is bench/effect's choice (it explains it).
 * --rate-mbit (0: none) adds a bottleneck: a packet leaves the line no
 * earlier than the previous one plus its serialisation time at that rate,
 * and a packet that finds more than --buffer-bytes waiting for the link is
 * dropped (`bottleneck`), as by a router's tail-drop queue.
 *
 * Control on stdin, one command a line, each answered with one line on stdout:
 *   set DELAY_US LOSS      -> "ok ..."     new packets get this delay / loss
 *   stats                  -> one JSON line of counters (both directions)
 *   quit                   -> "bye", exit 0
 * EOF on stdin, SIGTERM, SIGINT, the parent's death (PR_SET_PDEATHSIG),
 * --max-seconds or --max-bytes end it too (exit 0, 0, 0, 3, 4).
 * The first line it prints is "ready DEV_A DEV_B" once both devices exist.
 *
 * Bounded: it runs at most --max-seconds (default 1800) and forwards at most
 * --max-bytes (default 256 GiB); each loop iteration reads at most BATCH
 * packets per device.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#define SLOT 2048   /* > the 1500-byte MTU bench/effect sets; a longer packet is counted `oversize` */
#define BATCH 64    /* packets read per device per loop iteration: the other direction is never starved */
#define LATE_BUCKETS 16
/* With --rate-mbit every packet has its own departure time, tens of
 * microseconds apart: one wakeup per packet cost the line two thirds of a
 * CPU at 300 Mbit/s. A packet due within SLACK_NS leaves with the ones due
 * now (bursts of at most 0.2 ms at the rate). */
#define SLACK_NS 200000ull

struct packet {
    uint64_t due_ns;
    uint32_t len;
};

struct direction {
    const char *name;
    int in_fd, out_fd;
    uint32_t cap, head, count;
    struct packet *meta;
    unsigned char *data;
    uint64_t link_free_ns;  /* --rate-mbit: when the bottleneck is free again */
    /* counters */
    uint64_t in_packets, in_bytes, out_packets, out_bytes;
    uint64_t lost, full, bottleneck, oversize, write_errors, max_count;
    uint64_t late[LATE_BUCKETS]; /* how late a packet left: bucket i = [2^i, 2^(i+1)) us, 0 = < 2 us */
};

static volatile sig_atomic_t stop_signal;
static uint64_t delay_ns, rate_bps, buffer_bytes, max_bytes, rng;
static double loss;

static void on_signal(int sig) { stop_signal = sig; }

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static double uniform(void) /* xorshift64*: reproducible with --seed, enough for a loss draw */
{
    rng ^= rng >> 12;
    rng ^= rng << 25;
    rng ^= rng >> 27;
    return (double)((rng * 2685821657736338717ull) >> 11) / 9007199254740992.0;
}

static void die(const char *what)
{
    fprintf(stderr, "effect_delayline: %s: %s\n", what, strerror(errno));
    exit(2);
}

static int open_tun(const char *netns, const char *dev)
{
    int ns = open(netns, O_RDONLY | O_CLOEXEC);
    if (ns < 0)
        die(netns);
    if (setns(ns, CLONE_NEWNET) != 0)
        die("setns");
    close(ns);
    int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0)
        die("/dev/net/tun");
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_flags = IFF_TUN | IFF_NO_PI; /* L3 packets, no offloads: the stack hands over MTU-sized packets */
    if (strlen(dev) >= IFNAMSIZ) {
        errno = ENAMETOOLONG;
        die(dev);
    }
    strcpy(ifr.ifr_name, dev);
    if (ioctl(fd, TUNSETIFF, &ifr) != 0)
        die("TUNSETIFF");
    return fd;
}

static void enqueue(struct direction *d, const unsigned char *buf, ssize_t n, uint64_t now)
{
    d->in_packets++;
    d->in_bytes += (uint64_t)n;
    if (n > SLOT) {
        d->oversize++;
        return;
    }
    if (loss > 0 && uniform() < loss) {
        d->lost++;
        return;
    }
    if (d->count == d->cap) {
        d->full++;
        return;
    }
    uint64_t leave = now;
    if (rate_bps) {
        uint64_t waiting_ns = d->link_free_ns > now ? d->link_free_ns - now : 0;
        if (waiting_ns * rate_bps / 8000000000ull + (uint64_t)n > buffer_bytes) {
            d->bottleneck++;
            return;
        }
        uint64_t start = d->link_free_ns > now ? d->link_free_ns : now;
        leave = start + (uint64_t)n * 8ull * 1000000000ull / rate_bps;
        d->link_free_ns = leave;
    }
    uint32_t slot = (d->head + d->count) % d->cap;
    d->meta[slot].due_ns = leave + delay_ns;
    d->meta[slot].len = (uint32_t)n;
    memcpy(d->data + (size_t)slot * SLOT, buf, (size_t)n);
    d->count++;
    if (d->count > d->max_count)
        d->max_count = d->count;
}

static void drain(struct direction *d, uint64_t now)
{
    while (d->count && d->meta[d->head].due_ns <= now + SLACK_NS) {
        struct packet *p = &d->meta[d->head];
        if (write(d->out_fd, d->data + (size_t)d->head * SLOT, p->len) == (ssize_t)p->len) {
            d->out_packets++;
            d->out_bytes += p->len;
        } else {
            d->write_errors++;
        }
        uint64_t late_us = now > p->due_ns ? (now - p->due_ns) / 1000 : 0;
        int bucket = 0;
        while (late_us >= 2 && bucket < LATE_BUCKETS - 1) {
            late_us >>= 1;
            bucket++;
        }
        d->late[bucket]++;
        d->head = (d->head + 1) % d->cap;
        d->count--;
    }
}

static void print_direction(const struct direction *d)
{
    printf("\"%s\":{\"in_packets\":%llu,\"in_bytes\":%llu,\"out_packets\":%llu,\"out_bytes\":%llu,"
           "\"lost\":%llu,\"full\":%llu,\"bottleneck\":%llu,\"oversize\":%llu,\"write_errors\":%llu,\"queued\":%u,"
           "\"max_queued\":%llu,\"late_us_log2\":[",
           d->name, (unsigned long long)d->in_packets, (unsigned long long)d->in_bytes,
           (unsigned long long)d->out_packets, (unsigned long long)d->out_bytes, (unsigned long long)d->lost,
           (unsigned long long)d->full, (unsigned long long)d->bottleneck, (unsigned long long)d->oversize, (unsigned long long)d->write_errors,
           d->count, (unsigned long long)d->max_count);
    for (int i = 0; i < LATE_BUCKETS; i++)
        printf("%s%llu", i ? "," : "", (unsigned long long)d->late[i]);
    printf("]}");
}

static void print_stats(const struct direction *ab, const struct direction *ba)
{
    printf("{\"delay_us\":%llu,\"loss\":%.9g,\"rate_bps\":%llu,\"buffer_bytes\":%llu,\"queue\":%u,",
           (unsigned long long)(delay_ns / 1000), loss, (unsigned long long)rate_bps,
           (unsigned long long)buffer_bytes, ab->cap);
    print_direction(ab);
    printf(",");
    print_direction(ba);
    printf("}\n");
    fflush(stdout);
}

/* One command from stdin; returns 0 to go on, 1 to quit. */
static int command(char *line, struct direction *ab, struct direction *ba)
{
    unsigned long long us;
    double l;
    if (strncmp(line, "set ", 4) == 0) {
        if (sscanf(line + 4, "%llu %lf", &us, &l) == 2 && us <= 10000000ull && l >= 0 && l < 1) {
            delay_ns = us * 1000ull;
            loss = l;
            printf("ok delay_us=%llu loss=%.9g\n", us, l);
        } else {
            printf("error: set DELAY_US LOSS (0 <= DELAY_US <= 10000000, 0 <= LOSS < 1): %s\n", line);
        }
    } else if (strcmp(line, "stats") == 0) {
        print_stats(ab, ba);
        return 0;
    } else if (strcmp(line, "quit") == 0) {
        printf("bye\n");
        fflush(stdout);
        return 1;
    } else {
        printf("error: unknown command: %s\n", line);
    }
    fflush(stdout);
    return 0;
}

static const char *arg(int argc, char **argv, const char *name, const char *fallback)
{
    for (int i = 1; i + 1 < argc; i += 2)
        if (strcmp(argv[i], name) == 0)
            return argv[i + 1];
    return fallback;
}

int main(int argc, char **argv)
{
    const char *ns_a = arg(argc, argv, "--ns-a", NULL), *ns_b = arg(argc, argv, "--ns-b", NULL);
    const char *dev_a = arg(argc, argv, "--dev-a", NULL), *dev_b = arg(argc, argv, "--dev-b", NULL);
    if (!ns_a || !ns_b || !dev_a || !dev_b || argc % 2 == 0) {
        fprintf(stderr, "usage: %s --ns-a PATH --dev-a NAME --ns-b PATH --dev-b NAME [--delay-us N] [--loss F] "
                "[--rate-mbit R] [--buffer-bytes B] [--queue N] [--max-seconds S] [--max-bytes B] [--seed N]\n", argv[0]);
        return 2;
    }
    delay_ns = strtoull(arg(argc, argv, "--delay-us", "0"), NULL, 10) * 1000ull;
    loss = strtod(arg(argc, argv, "--loss", "0"), NULL);
    rate_bps = (uint64_t)(strtod(arg(argc, argv, "--rate-mbit", "0"), NULL) * 1e6);
    /* Default bottleneck buffer: 100 ms at the rate (one BDP of the longest
     * path bench/effect measures), at least 64 KiB. */
    buffer_bytes = strtoull(arg(argc, argv, "--buffer-bytes", "0"), NULL, 10);
    if (!buffer_bytes)
        buffer_bytes = rate_bps / 8 / 10 > 65536 ? rate_bps / 8 / 10 : 65536;
    uint32_t cap = (uint32_t)strtoul(arg(argc, argv, "--queue", "16384"), NULL, 10);
    double max_seconds = strtod(arg(argc, argv, "--max-seconds", "1800"), NULL);
    max_bytes = strtoull(arg(argc, argv, "--max-bytes", "274877906944"), NULL, 10);
    rng = strtoull(arg(argc, argv, "--seed", "1"), NULL, 10) | 1;
    if (cap < 16 || cap > 1u << 20 || loss < 0 || loss >= 1 || max_seconds <= 0 || max_seconds > 86400) {
        fprintf(stderr, "effect_delayline: --queue must be in [16, 1048576], --loss in [0, 1), "
                "--max-seconds in (0, 86400]\n");
        return 2;
    }

    prctl(PR_SET_PDEATHSIG, SIGTERM); /* never outlive bench/effect */
    if (getppid() == 1)
        return 2;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    struct direction ab = {.name = "a_to_b", .cap = cap}, ba = {.name = "b_to_a", .cap = cap};
    ab.in_fd = ba.out_fd = open_tun(ns_a, dev_a);
    ba.in_fd = ab.out_fd = open_tun(ns_b, dev_b);
    struct direction *dirs[2] = {&ab, &ba};
    for (int i = 0; i < 2; i++) {
        dirs[i]->meta = calloc(cap, sizeof(struct packet));
        dirs[i]->data = calloc(cap, SLOT);
        if (!dirs[i]->meta || !dirs[i]->data)
            die("calloc");
    }
    printf("ready %s %s\n", dev_a, dev_b);
    fflush(stdout);

    const uint64_t deadline = now_ns() + (uint64_t)(max_seconds * 1e9);
    unsigned char buf[SLOT + 64];
    char line[256];
    size_t line_len = 0;
    int status = 0;
    fcntl(0, F_SETFL, fcntl(0, F_GETFL) | O_NONBLOCK);
    while (!stop_signal) {
        uint64_t now = now_ns();
        if (now >= deadline) {
            fprintf(stderr, "effect_delayline: --max-seconds reached\n");
            status = 3;
            break;
        }
        if (ab.out_bytes + ba.out_bytes >= max_bytes) {
            fprintf(stderr, "effect_delayline: --max-bytes reached\n");
            status = 4;
            break;
        }
        /* Sleep until a packet arrives, a queued one is due, or a command comes. */
        uint64_t wake = deadline;
        for (int i = 0; i < 2; i++)
            if (dirs[i]->count && dirs[i]->meta[dirs[i]->head].due_ns < wake)
                wake = dirs[i]->meta[dirs[i]->head].due_ns;
        uint64_t wait = wake > now ? wake - now : 0;
        if (wait > 200000000ull)
            wait = 200000000ull;
        struct timespec ts = {.tv_sec = (time_t)(wait / 1000000000ull), .tv_nsec = (long)(wait % 1000000000ull)};
        struct pollfd fds[3] = {{ab.in_fd, POLLIN, 0}, {ba.in_fd, POLLIN, 0}, {0, POLLIN, 0}};
        int ready = ppoll(fds, 3, &ts, NULL);
        if (ready < 0 && errno != EINTR)
            die("ppoll");
        now = now_ns();
        for (int i = 0; ready > 0 && i < 2; i++) {
            if (!(fds[i].revents & POLLIN))
                continue;
            for (int k = 0; k < BATCH; k++) {
                ssize_t n = read(dirs[i]->in_fd, buf, sizeof buf);
                if (n <= 0)
                    break;
                enqueue(dirs[i], buf, n, now);
            }
        }
        if (ready > 0 && (fds[2].revents & (POLLIN | POLLHUP))) {
            ssize_t n = read(0, line + line_len, sizeof line - 1 - line_len);
            if (n == 0)
                break; /* bench/effect went away */
            if (n > 0) {
                line_len += (size_t)n;
                char *nl;
                while ((nl = memchr(line, '\n', line_len)) != NULL) {
                    *nl = 0;
                    if (command(line, &ab, &ba))
                        goto out;
                    size_t used = (size_t)(nl - line) + 1;
                    memmove(line, nl + 1, line_len - used);
                    line_len -= used;
                }
                if (line_len == sizeof line - 1)
                    line_len = 0; /* an over-long line: dropped */
            }
        }
        now = now_ns();
        drain(&ab, now);
        drain(&ba, now);
    }
out:
    return status;
}
