/*
 * png_shared: one image cache shared by several processes (lf_shared_cache). The parent makes a
 * shared cache in /dev/shm and starts N children (4 by default), each running this program again
 * (fork + exec: see "fork" in lazyfree.h). Each child opens the cache by name with its own
 * regenerate callback, which decodes the rows of a PNG holding the chunk asked for (libpng);
 * inserts every image (the first insert of a key makes the entry, the others find
 * it); reads every byte, the even children through the pointer lf_shared_cache_insert() gives
 * (a touch of a missing chunk decodes it on one of the process's workers), the odd ones through
 * lf_shared_cache_pin() (which decodes on the calling thread); and compares them with its own
 * libpng decode. A chunk decoded by one process is there for all of them, so each chunk is
 * decoded once across all processes: the parent checks that against the fills counted in the
 * cache's file and the children's own counts.
 *
 * Exit status 0 when every byte of every image was right in every process and no chunk was
 * decoded twice; 1 on a mismatch; 2 when the program could not run.
 *
 *   png_shared [--children=N] [file.png ...]
 *       default files: every PNG in $PNG_CACHE_DIR, or where that is unset, in
 *       /usr/share/backgrounds/sway (Debian package sway-backgrounds)
 *   png_shared --child=INDEX,READY,GO,RESULTS NAME file.png ...
 *       how the parent runs a child: its index, its pipe descriptors and the cache's name
 *
 * Build: make -C examples/c (static and shared), see the Makefile.
 */
#define _DEFAULT_SOURCE
#include <errno.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "lazyfree.h"
#include "png_decode.h"

/* The unit of decoding and purging. Each callback call decodes from the top of the image down
 * to the chunk's last row, so larger chunks mean fewer decodes per image. */
#define CHUNK ((size_t)1 << 20)

struct image {
    const char *path;
    uint32_t width, height;
    size_t bytes; /* width * height * 4 */
};

/* A process's callback context: the images (the same table in every process: the children
 * inherit it) and the chunks this process decoded. */
struct decoder {
    const struct image *images;
    size_t count;
    atomic_uint decodes;
    const char *who;
};

static atomic_int decoders_freed;

/* The cache's callback, in every process: decodes the rows of image `key` holding
 * [offset, offset + len). Runs on the process's worker threads or a pinning thread, several at
 * once: it shares nothing but the atomic count. */
static int regen_png(void *ctx, uint64_t key, size_t offset, uint8_t *buf, size_t len) {
    struct decoder *d = ctx;
    char err[512];
    if (key >= d->count) {
        fprintf(stderr, "png_shared: %s: no image under key %llu\n", d->who,
                (unsigned long long)key);
        return 1;
    }
    atomic_fetch_add(&d->decodes, 1);
    if (decode(d->images[key].path, offset, buf, len, NULL, NULL, err, sizeof err) != 0) {
        fprintf(stderr, "png_shared: %s: regenerate failed: %s\n", d->who, err);
        return 1;
    }
    return 0;
}

static void free_decoder(void *ctx) {
    free(ctx);
    atomic_fetch_add(&decoders_freed, 1);
}

static struct decoder *decoder_new(const struct image *images, size_t count, const char *who) {
    struct decoder *d = calloc(1, sizeof *d);
    if (d == NULL)
        return NULL;
    d->images = images;
    d->count = count;
    d->who = who;
    atomic_init(&d->decodes, 0);
    return d;
}

static int fail_lf(const char *who, const char *what, lf_status s) {
    fprintf(stderr, "png_shared: %s: %s: %s: %s\n", who, what, lf_status_str(s),
            lf_last_error_message());
    return 2;
}

static size_t chunks_of(size_t bytes) {
    return (bytes + CHUNK - 1) / CHUNK;
}

/* What a child reports to the parent through a pipe (one write, atomic under PIPE_BUF). */
struct report {
    int index;
    unsigned intact;  /* images whose every byte was right */
    unsigned decodes; /* chunks decoded in this process */
};

/* ---- a child ------------------------------------------------------------------------------ */

static bool read_byte(int fd) {
    char b;
    ssize_t r;
    while ((r = read(fd, &b, 1)) < 0 && errno == EINTR)
        ;
    return r == 1;
}

/*
 * Opens the cache, decodes its own reference copy of every image, says it is ready on `ready`,
 * waits for `go` to close, then reads every image out of the cache and compares. Returns the
 * exit status.
 */
static int child(int index, const char *name, const struct image *images, size_t count,
                 int ready, int go, int results) {
    char who[32];
    snprintf(who, sizeof who, "child %d", index);
    bool pin = index % 2 == 1;
    struct decoder *dec = decoder_new(images, count, who);
    if (dec == NULL)
        return 2;
    lf_shared_cache *cache = NULL;
    lf_status s = lf_shared_cache_open(name, regen_png, dec, free_decoder, &cache);
    if (s != LF_OK) {
        free_decoder(dec);
        return fail_lf(who, "lf_shared_cache_open", s);
    }
    /* Its own decode of every image, before the start, so that all children read the cache at
     * the same time. */
    uint8_t **mine = calloc(count, sizeof *mine);
    int status = mine == NULL ? 2 : 0;
    for (size_t i = 0; status == 0 && i < count; i++) {
        char err[512];
        mine[i] = malloc(images[i].bytes);
        if (mine[i] == NULL ||
            decode(images[i].path, 0, mine[i], images[i].bytes, NULL, NULL, err, sizeof err) != 0) {
            fprintf(stderr, "png_shared: %s: %s\n", who, mine[i] ? err : "out of memory");
            status = 2;
        }
    }
    if (write(ready, "r", 1) != 1)
        status = 2;
    close(ready);
    read_byte(go); /* end of file: go */

    unsigned intact = 0;
    for (size_t i = 0; status != 2 && i < count; i++) {
        const uint8_t *px = NULL;
        size_t len = images[i].bytes;
        if ((s = lf_shared_cache_insert(cache, i, len, &px)) != LF_OK) {
            status = fail_lf(who, "lf_shared_cache_insert", s);
            continue;
        }
        if (pin && (s = lf_shared_cache_pin(cache, i, &px, &len)) != LF_OK) {
            status = fail_lf(who, "lf_shared_cache_pin", s);
            continue;
        }
        /* Reads every byte: a missing chunk is decoded by this process or waited for. */
        bool same = len == images[i].bytes && memcmp(px, mine[i], len) == 0;
        bool failed = true;
        if ((s = lf_shared_cache_is_failed(cache, i, &failed)) != LF_OK)
            status = fail_lf(who, "lf_shared_cache_is_failed", s);
        if (pin && (s = lf_shared_cache_unpin(cache, i)) != LF_OK)
            status = fail_lf(who, "lf_shared_cache_unpin", s);
        if (same && !failed) {
            intact++;
        } else {
            printf("%s: %s MISMATCH%s\n", who, images[i].path, failed ? " (failed chunk)" : "");
            status = status ? status : 1;
        }
    }
    struct report r = {index, intact, atomic_load(&dec->decodes)};
    printf("%s (pid %ld, reads %s): %u of %zu images intact, chunks decoded here: %u\n", who,
           (long)getpid(), pin ? "through pins" : "through the pointer", intact, count,
           r.decodes);
    if (write(results, &r, sizeof r) != (ssize_t)sizeof r)
        status = 2;
    close(results);
    lf_shared_cache_free(cache); /* calls free_decoder */
    if (atomic_load(&decoders_freed) != 1) {
        fprintf(stderr, "png_shared: %s: the callback context was not freed\n", who);
        status = 2;
    }
    for (size_t i = 0; mine != NULL && i < count; i++)
        free(mine[i]);
    free(mine);
    return status;
}

/* The size of every image, from its header; NULL with a message on stderr if one cannot be
 * read. */
static struct image *load_images(char **paths, size_t n) {
    struct image *images = calloc(n, sizeof *images);
    if (images == NULL)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        char err[512];
        images[i].path = paths[i];
        if (decode(paths[i], 0, NULL, 0, &images[i].width, &images[i].height, err, sizeof err) !=
            0) {
            fprintf(stderr, "png_shared: %s\n", err);
            free(images);
            return NULL;
        }
        images[i].bytes = (size_t)images[i].width * images[i].height * 4;
    }
    return images;
}

/* A child's main: --child=INDEX,READY,GO,RESULTS NAME file.png ... */
static int child_main(int argc, char **argv) {
    int index, ready, go, results;
    if (argc < 4 || sscanf(argv[1], "--child=%d,%d,%d,%d", &index, &ready, &go, &results) != 4) {
        fprintf(stderr, "png_shared: %s: want --child=INDEX,READY,GO,RESULTS NAME file.png ...\n",
                argv[1]);
        return 2;
    }
    size_t n = (size_t)(argc - 3);
    struct image *images = load_images(argv + 3, n);
    if (images == NULL)
        return 2;
    int status = child(index, argv[2], images, n, ready, go, results);
    free(images);
    return status;
}

/* ---- the parent --------------------------------------------------------------------------- */

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0); /* lines in order, whoever prints them */
    if (argc > 1 && strncmp(argv[1], "--child=", 8) == 0)
        return child_main(argc, argv);
    int children = 4;
    int first = 1;
    if (argc > 1 && strncmp(argv[1], "--children=", 11) == 0) {
        children = atoi(argv[1] + 11);
        if (children < 1 || children > 62) {
            fprintf(stderr, "png_shared: %s: give 1 to 62 children (63 processes may have a "
                            "shared cache open)\n", argv[1]);
            return 2;
        }
        first = 2;
    }
    size_t n = 0;
    char **paths = NULL, **owned = NULL;
    if (argc > first) {
        paths = argv + first;
        n = (size_t)(argc - first);
    } else {
        const char *dir = getenv("PNG_CACHE_DIR");
        if (dir == NULL || *dir == '\0')
            dir = DEFAULT_DIR;
        paths = owned = pngs_in(dir, &n);
        if (paths == NULL || n == 0) {
            fprintf(stderr,
                    "png_shared: no PNG files in %s: install the Debian package "
                    "sway-backgrounds, set PNG_CACHE_DIR, or name PNG files on the command line\n",
                    dir);
            free(owned);
            return 2;
        }
    }

    struct image *images = load_images(paths, n);
    if (images == NULL)
        return 2;
    size_t capacity = 0, chunks = 0;
    for (size_t i = 0; i < n; i++) {
        capacity += chunks_of(images[i].bytes) * CHUNK;
        chunks += chunks_of(images[i].bytes);
    }

    /* A cache just large enough for every image, without a budget: nothing is purged, so
     * every chunk is decoded exactly once. */
    char name[64];
    snprintf(name, sizeof name, "png_shared-%ld", (long)getpid());
    lf_shared_config cfg;
    lf_status s = lf_shared_config_default(&cfg);
    if (s != LF_OK)
        return fail_lf("parent", "lf_shared_config_default", s);
    cfg.capacity = capacity;
    cfg.chunk = CHUNK;
    cfg.entries = n;
    struct decoder *dec = decoder_new(images, n, "parent");
    lf_shared_cache *cache = NULL;
    if (dec == NULL)
        return 2;
    if ((s = lf_shared_cache_create(name, &cfg, regen_png, dec, free_decoder, &cache)) != LF_OK) {
        free_decoder(dec);
        return fail_lf("parent", "lf_shared_cache_create", s);
    }
    printf("png_shared: %zu images, %zu chunks of %zu KiB, in /dev/shm/lazyfree.%s; %d "
           "children\n",
           n, chunks, CHUNK >> 10, name, children);

    int ready[2], go[2], results[2];
    if (pipe(ready) != 0 || pipe(go) != 0 || pipe(results) != 0) {
        perror("png_shared: pipe");
        return 2;
    }
    /* Each child runs this program again: its arguments are made before the fork, because the
     * forked child of a process with threads (the cache's) may only make async-signal-safe
     * calls (close, execv, _exit) until exec. */
    pid_t *pids = calloc((size_t)children, sizeof *pids);
    char **args = calloc(n + 4, sizeof *args);
    char child_arg[64];
    if (pids == NULL || args == NULL)
        return 2;
    args[0] = argv[0];
    args[1] = child_arg;
    args[2] = name;
    for (size_t i = 0; i < n; i++)
        args[3 + i] = paths[i];
    for (int i = 0; i < children; i++) {
        snprintf(child_arg, sizeof child_arg, "--child=%d,%d,%d,%d", i, ready[1], go[0],
                 results[1]);
        pids[i] = fork();
        if (pids[i] < 0) {
            perror("png_shared: fork");
            return 2;
        }
        if (pids[i] == 0) {
            close(ready[0]);
            close(go[1]);
            close(results[0]);
            execv("/proc/self/exe", args);
            static const char msg[] = "png_shared: a child cannot run /proc/self/exe\n";
            ssize_t w = write(2, msg, sizeof msg - 1);
            (void)w;
            _exit(127);
        }
    }
    free(args);
    close(ready[1]);
    close(go[0]);
    close(results[1]);

    /* Once every child has the cache open, the name can go: the file stays until the last
     * process closes it. */
    int status = 0;
    int up = 0;
    while (up < children && read_byte(ready[0]))
        up++;
    lf_shared_stats st;
    if ((s = lf_shared_cache_stats(cache, &st)) != LF_OK)
        return fail_lf("parent", "lf_shared_cache_stats", s);
    printf("png_shared: %u processes have the cache open\n", st.processes);
    if (up != children || st.processes != (uint32_t)children + 1)
        status = 2;
    if ((s = lf_shared_cache_remove(name)) != LF_OK)
        status = fail_lf("parent", "lf_shared_cache_remove", s);
    close(go[1]); /* go */

    unsigned decoded = 0, reported = 0;
    struct report r;
    while (read(results[0], &r, sizeof r) == (ssize_t)sizeof r) {
        decoded += r.decodes;
        reported++;
        if (r.intact != n)
            status = status ? status : 1;
    }
    close(results[0]);
    close(ready[0]);
    for (int i = 0; i < children; i++) {
        int ws = 0;
        while (waitpid(pids[i], &ws, 0) < 0 && errno == EINTR)
            ;
        if (!WIFEXITED(ws) || WEXITSTATUS(ws) != 0) {
            fprintf(stderr, "png_shared: child %d ended with status %#x\n", i, ws);
            status = status ? status : (WIFEXITED(ws) ? WEXITSTATUS(ws) : 2);
        }
    }
    if (reported != (unsigned)children)
        status = 2;

    /* The counts in the file: each chunk decoded once, by one of the children. Then the parent
     * reads every image too, through a pin: everything is there, nothing is decoded again. */
    if ((s = lf_shared_cache_stats(cache, &st)) != LF_OK)
        return fail_lf("parent", "lf_shared_cache_stats", s);
    for (size_t i = 0; i < n; i++) {
        uint64_t fills = 0;
        const uint8_t *px = NULL;
        size_t len = 0;
        if ((s = lf_shared_cache_fills(cache, i, &fills)) != LF_OK ||
            (s = lf_shared_cache_pin(cache, i, &px, &len)) != LF_OK) {
            status = fail_lf("parent", "lf_shared_cache_fills or lf_shared_cache_pin", s);
            continue;
        }
        uint64_t sum = fnv1a(px, len);
        if ((s = lf_shared_cache_unpin(cache, i)) != LF_OK)
            status = fail_lf("parent", "lf_shared_cache_unpin", s);
        bool once = fills == chunks_of(images[i].bytes);
        printf("%-60s %5u x %-5u %3zu chunks, decoded %llu times%s  checksum %016llx\n",
               images[i].path, images[i].width, images[i].height, chunks_of(images[i].bytes),
               (unsigned long long)fills, once ? "" : " MISMATCH", (unsigned long long)sum);
        if (!once)
            status = status ? status : 1;
    }
    lf_shared_stats after;
    if ((s = lf_shared_cache_stats(cache, &after)) != LF_OK)
        return fail_lf("parent", "lf_shared_cache_stats", s);
    printf("png_shared: fills counted in the file: %llu for %zu chunks; decoded by the "
           "children: %u; by the parent: %u; failures: %llu; processes open now: %u\n",
           (unsigned long long)st.fills, chunks, decoded, atomic_load(&dec->decodes),
           (unsigned long long)st.failures, after.processes);
    bool once = st.fills == chunks && decoded == chunks && after.fills == st.fills &&
                atomic_load(&dec->decodes) == 0 && st.failures == 0 && after.processes == 1;
    if (once) {
        printf("png_shared: each chunk decoded once across all %d processes\n", children + 1);
    } else {
        printf("png_shared: MISMATCH: chunks decoded more than once, or not at all\n");
        status = status ? status : 1;
    }
    lf_shared_cache_free(cache); /* calls free_decoder */
    if (atomic_load(&decoders_freed) != 1) {
        fprintf(stderr, "png_shared: the parent's callback context was not freed\n");
        status = 2;
    }
    free(pids);
    free(images);
    for (size_t i = 0; owned != NULL && i < n; i++)
        free(owned[i]);
    free(owned);
    printf("png_shared: %s\n", status == 0 ? "every image intact in every process" : "FAILED");
    return status;
}
