/*
 * Unit tests of the shared-cache C API (lf_shared_cache_* in include/lazyfree.h), against the
 * real kernel: files in /dev/shm, userfaultfd, threads, a purge that punches holes, and a second
 * process (fork + exec) that opens the cache by name. Built by examples/c/Makefile with -Wall
 * -Wextra -Werror -pedantic and ASAN+UBSAN, run by ffi/tests/c_abi.rs.
 *
 * Every cache is named shared-test-<pid>-<what> and removed before the program ends, also when
 * a REQUIRE stops it.
 *
 * Prints "N passed, N failed" last; exits 0 when nothing failed, 77 when no shared cache can be
 * made here (no userfaultfd, no /dev/shm), with a SKIPPED line saying why.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "check.h"
#include "lazyfree.h"

#define CHUNK 65536u

/* ---- names -------------------------------------------------------------------------------- */

/* The names made by this run, removed at exit. */
static char names[16][64];
static int nnames;

/* A name of this run for `what`. */
static const char *name_for(const char *what) {
    REQUIRE(nnames < (int)(sizeof names / sizeof names[0]));
    snprintf(names[nnames], sizeof names[0], "shared-test-%ld-%s", (long)getpid(), what);
    return names[nnames++];
}

static pid_t main_pid;

static void remove_names(void) {
    if (getpid() != main_pid)
        return; /* a forked child: the names are the parent's */
    for (int i = 0; i < nnames; i++)
        (void)lf_shared_cache_remove(names[i]); /* LF_SHARED_NOT_FOUND for those removed */
}

static bool file_exists(const char *name) {
    char path[128];
    snprintf(path, sizeof path, "/dev/shm/lazyfree.%s", name);
    return access(path, F_OK) == 0;
}

/* ---- the callback ------------------------------------------------------------------------- */

/* The bytes of entry `key` at `offset`: what every process's callback produces. */
static uint8_t pattern(uint64_t key, size_t offset) {
    uint64_t x = (uint64_t)offset * 0x9E3779B97F4A7C15ull ^ (key + 1) * 0xD1B54A32D192ED03ull;
    return (uint8_t)(x >> 56);
}

struct sctx {
    atomic_int calls;
    atomic_llong fail_key; /* the key whose callback fails; -1: none */
    atomic_int bad_range;  /* a call off the chunk grid, or longer than a chunk */
    atomic_long tid;       /* the thread of the last call */
};

static atomic_int ctx_frees;

static long my_tid(void) {
    return (long)syscall(SYS_gettid);
}

static struct sctx *sctx_new(void) {
    struct sctx *c = calloc(1, sizeof *c);
    REQUIRE(c != NULL);
    atomic_init(&c->calls, 0);
    atomic_init(&c->fail_key, -1);
    atomic_init(&c->bad_range, 0);
    atomic_init(&c->tid, 0);
    return c;
}

static void sctx_free(void *p) {
    atomic_fetch_add(&ctx_frees, 1);
    free(p);
}

static int regen(void *p, uint64_t key, size_t offset, uint8_t *buf, size_t len) {
    struct sctx *c = p;
    atomic_fetch_add(&c->calls, 1);
    atomic_store(&c->tid, my_tid());
    if (offset % CHUNK != 0 || len == 0 || len > CHUNK)
        atomic_store(&c->bad_range, 1);
    if ((long long)key == atomic_load(&c->fail_key))
        return 9;
    for (size_t i = 0; i < len; i++)
        buf[i] = pattern(key, offset + i);
    return 0;
}

/* ---- helpers ------------------------------------------------------------------------------ */

static lf_shared_config config_of(size_t capacity, size_t entries) {
    lf_shared_config cfg;
    REQUIRE(lf_shared_config_default(&cfg) == LF_OK);
    cfg.capacity = capacity;
    cfg.chunk = CHUNK;
    cfg.entries = entries;
    return cfg;
}

static lf_shared_cache *make(const char *name, size_t capacity, size_t entries, struct sctx *x) {
    lf_shared_config cfg = config_of(capacity, entries);
    lf_shared_cache *c = NULL;
    REQUIRE(lf_shared_cache_create(name, &cfg, regen, x, sctx_free, &c) == LF_OK && c != NULL);
    return c;
}

static lf_shared_stats stats_of(const lf_shared_cache *c) {
    lf_shared_stats s;
    REQUIRE(lf_shared_cache_stats(c, &s) == LF_OK);
    return s;
}

static uint64_t fills_of(const lf_shared_cache *c, uint64_t key) {
    uint64_t n = 0;
    REQUIRE(lf_shared_cache_fills(c, key, &n) == LF_OK);
    return n;
}

static bool failed_of(const lf_shared_cache *c, uint64_t key) {
    bool f = false;
    REQUIRE(lf_shared_cache_is_failed(c, key, &f) == LF_OK);
    return f;
}

static size_t chunks_of(size_t len) {
    return (len + CHUNK - 1) / CHUNK;
}

/* Whether `len` bytes at `d` are entry `key`'s, every byte (reading rebuilds what is missing). */
static bool bytes_match(const uint8_t *d, size_t len, uint64_t key) {
    for (size_t i = 0; i < len; i++)
        if (d[i] != pattern(key, i))
            return false;
    return true;
}

/* ---- tests -------------------------------------------------------------------------------- */

static void test_statuses(void) {
    /* Stable values: they are part of the ABI. */
    CHECK(LF_SHARED_EXISTS == 15 && LF_SHARED_NOT_FOUND == 16 && LF_BAD_SHARED_FILE == 17 &&
          LF_SHARED_TOO_MANY_PROCESSES == 18 && LF_SHARED_LENGTH_MISMATCH == 19 &&
          LF_SHARED_FULL == 20);
    const char *unknown = lf_status_str((lf_status)999);
    for (int s = LF_OK; s <= LF_SHARED_FULL; s++) {
        const char *str = lf_status_str((lf_status)s);
        CHECK(str != NULL && strlen(str) > 0 && strcmp(str, unknown) != 0);
        for (int t = LF_OK; t < s; t++)
            CHECK(strcmp(str, lf_status_str((lf_status)t)) != 0);
    }
    CHECK(strcmp(lf_status_str((lf_status)(LF_SHARED_FULL + 1)), unknown) == 0);
}

static void test_config_names_and_null_arguments(void) {
    lf_shared_config cfg;
    CHECK_STATUS(lf_shared_config_default(NULL), LF_NULL_ARGUMENT);
    CHECK(strstr(lf_last_error_message(), "lf_shared_config_default") != NULL);
    CHECK_STATUS(lf_shared_config_default(&cfg), LF_OK);
    CHECK(cfg.capacity == (size_t)1 << 30 && cfg.chunk == 65536 && cfg.entries == 4096 &&
          cfg.budget == 0);

    int frees = atomic_load(&ctx_frees);
    struct sctx *x = sctx_new();
    lf_shared_cache *c = SENTINEL;
    const char *name = name_for("bad");

    /* NULL arguments: nothing made, nothing kept (ctx stays ours), the argument named. */
    CHECK_STATUS(lf_shared_cache_create(NULL, NULL, regen, x, sctx_free, &c), LF_NULL_ARGUMENT);
    CHECK(strstr(lf_last_error_message(), "name") != NULL);
    CHECK_STATUS(lf_shared_cache_create(name, NULL, NULL, x, sctx_free, &c), LF_NULL_ARGUMENT);
    CHECK(strstr(lf_last_error_message(), "regen") != NULL);
    CHECK_STATUS(lf_shared_cache_create(name, NULL, regen, x, sctx_free, NULL), LF_NULL_ARGUMENT);
    CHECK(strstr(lf_last_error_message(), "out") != NULL);
    CHECK_STATUS(lf_shared_cache_open(NULL, regen, x, sctx_free, &c), LF_NULL_ARGUMENT);
    CHECK_STATUS(lf_shared_cache_open(name, NULL, x, sctx_free, &c), LF_NULL_ARGUMENT);
    CHECK_STATUS(lf_shared_cache_open(name, regen, x, sctx_free, NULL), LF_NULL_ARGUMENT);
    CHECK_STATUS(lf_shared_cache_remove(NULL), LF_NULL_ARGUMENT);
    CHECK(c == SENTINEL && !file_exists(name));

    /* Bad names. */
    char longname[202];
    memset(longname, 'x', sizeof longname - 1);
    longname[sizeof longname - 1] = '\0';
    const char *bad_names[] = {"", ".hidden", "a/b", "../x", "sp ace", "caf\xc3\xa9", "\xff",
                               longname};
    for (size_t i = 0; i < sizeof bad_names / sizeof bad_names[0]; i++) {
        CHECK_STATUS(lf_shared_cache_create(bad_names[i], NULL, regen, x, sctx_free, &c),
                     LF_INVALID_CONFIG);
        CHECK(strstr(lf_last_error_message(), "name") != NULL);
        CHECK_STATUS(lf_shared_cache_open(bad_names[i], regen, x, sctx_free, &c),
                     LF_INVALID_CONFIG);
        CHECK_STATUS(lf_shared_cache_remove(bad_names[i]), LF_INVALID_CONFIG);
    }

    /* Bad sizes: refused, and no file left behind. */
    lf_shared_config bad[5];
    for (int i = 0; i < 5; i++)
        bad[i] = config_of(16u << 20, 8);
    bad[0].chunk = 3 * 4096; /* not a power of two */
    bad[1].chunk = (size_t)128 << 20;
    bad[2].capacity = 0;
    bad[3].capacity = (16u << 20) + 4096;
    bad[4].entries = SIZE_MAX;
    for (int i = 0; i < 5; i++) {
        CHECK_STATUS(lf_shared_cache_create(name, &bad[i], regen, x, sctx_free, &c),
                     LF_INVALID_CONFIG);
        CHECK(strlen(lf_last_error_message()) > 0);
        CHECK(!file_exists(name));
    }

    /* A missing name. */
    CHECK_STATUS(lf_shared_cache_open(name, regen, x, sctx_free, &c), LF_SHARED_NOT_FOUND);
    CHECK(strstr(lf_last_error_message(), "lf_shared_cache_create()") != NULL);
    CHECK_STATUS(lf_shared_cache_remove(name), LF_SHARED_NOT_FOUND);
    CHECK(c == SENTINEL);
    CHECK(atomic_load(&ctx_frees) == frees && atomic_load(&x->calls) == 0);

    /* An existing name: the second create fails and keeps nothing. */
    lf_shared_cache *made = make(name, 16u << 20, 8, x);
    CHECK(file_exists(name));
    struct sctx *y = sctx_new();
    lf_shared_config cfg2 = config_of(16u << 20, 8);
    CHECK_STATUS(lf_shared_cache_create(name, &cfg2, regen, y, sctx_free, &c), LF_SHARED_EXISTS);
    CHECK(strstr(lf_last_error_message(), "lf_shared_cache_open()") != NULL);
    CHECK(c == SENTINEL && atomic_load(&ctx_frees) == frees);

    /* NULL handles and outputs. */
    const uint8_t *d = SENTINEL;
    size_t len = 5;
    uint64_t n = 5;
    bool f = true;
    lf_shared_stats st;
    CHECK_STATUS(lf_shared_cache_insert(NULL, 1, 10, &d), LF_NULL_ARGUMENT);
    CHECK(strstr(lf_last_error_message(), "cache") != NULL);
    CHECK_STATUS(lf_shared_cache_get(NULL, 1, &d, &len), LF_NULL_ARGUMENT);
    CHECK_STATUS(lf_shared_cache_pin(NULL, 1, &d, &len), LF_NULL_ARGUMENT);
    CHECK_STATUS(lf_shared_cache_unpin(NULL, 1), LF_NULL_ARGUMENT);
    CHECK_STATUS(lf_shared_cache_is_failed(NULL, 1, &f), LF_NULL_ARGUMENT);
    CHECK_STATUS(lf_shared_cache_fills(NULL, 1, &n), LF_NULL_ARGUMENT);
    CHECK_STATUS(lf_shared_cache_purge(NULL, 0, &len), LF_NULL_ARGUMENT);
    CHECK_STATUS(lf_shared_cache_set_budget(NULL, 0), LF_NULL_ARGUMENT);
    CHECK_STATUS(lf_shared_cache_stats(NULL, &st), LF_NULL_ARGUMENT);
    CHECK_STATUS(lf_shared_cache_insert(made, 1, 10, NULL), LF_OK); /* data may be NULL */
    CHECK_STATUS(lf_shared_cache_get(made, 1, NULL, &len), LF_NULL_ARGUMENT);
    CHECK(strstr(lf_last_error_message(), "data") != NULL);
    CHECK_STATUS(lf_shared_cache_pin(made, 1, NULL, &len), LF_NULL_ARGUMENT);
    CHECK_STATUS(lf_shared_cache_unpin(made, 1), LF_NOT_PINNED); /* the NULL pin pinned nothing */
    CHECK_STATUS(lf_shared_cache_is_failed(made, 1, NULL), LF_NULL_ARGUMENT);
    CHECK_STATUS(lf_shared_cache_fills(made, 1, NULL), LF_NULL_ARGUMENT);
    CHECK_STATUS(lf_shared_cache_stats(made, NULL), LF_NULL_ARGUMENT);
    CHECK(d == SENTINEL && len == 5 && n == 5 && f);
    CHECK_STATUS(lf_shared_cache_purge(made, 0, NULL), LF_OK); /* punched may be NULL */
    CHECK_STATUS(lf_shared_cache_get(made, 1, &d, NULL), LF_OK);  /* len may be NULL */
    CHECK(d != SENTINEL && bytes_match(d, 10, 1));
    lf_shared_cache_free(NULL); /* a no-op */

    /* The name can go while the cache is open: the handle keeps working, and the name is free
     * for a new cache. */
    CHECK_STATUS(lf_shared_cache_remove(name), LF_OK);
    CHECK(!file_exists(name));
    CHECK_STATUS(lf_shared_cache_remove(name), LF_SHARED_NOT_FOUND);
    CHECK_STATUS(lf_shared_cache_open(name, regen, y, sctx_free, &c), LF_SHARED_NOT_FOUND);
    CHECK_STATUS(lf_shared_cache_get(made, 1, &d, &len), LF_OK);
    CHECK(len == 10 && bytes_match(d, 10, 1));

    /* A file that is not a cache. */
    char path[128];
    snprintf(path, sizeof path, "/dev/shm/lazyfree.%s", name);
    FILE *junk = fopen(path, "wb");
    REQUIRE(junk != NULL);
    for (int i = 0; i < 8192; i++)
        fputc(0xab, junk);
    REQUIRE(fclose(junk) == 0);
    CHECK_STATUS(lf_shared_cache_open(name, regen, y, sctx_free, &c), LF_BAD_SHARED_FILE);
    CHECK(strstr(lf_last_error_message(), "lf_shared_cache_remove()") != NULL);
    CHECK_STATUS(lf_shared_cache_create(name, &cfg2, regen, y, sctx_free, &c), LF_SHARED_EXISTS);
    CHECK_STATUS(lf_shared_cache_remove(name), LF_OK);
    CHECK(c == SENTINEL);

    /* ctx: freed once, in lf_shared_cache_free(); y was never taken. */
    CHECK(atomic_load(&ctx_frees) == frees);
    lf_shared_cache_free(made);
    CHECK(atomic_load(&ctx_frees) == frees + 1);
    sctx_free(y);
    /* ctx_free may be NULL: ctx then stays the caller's. */
    struct sctx own;
    memset(&own, 0, sizeof own);
    atomic_init(&own.fail_key, -1);
    CHECK_STATUS(lf_shared_cache_create(name, NULL, regen, &own, NULL, &c), LF_OK);
    CHECK_STATUS(lf_shared_cache_insert(c, 3, 100, &d), LF_OK);
    CHECK(bytes_match(d, 100, 3));
    lf_shared_cache_free(c);
    CHECK(atomic_load(&ctx_frees) == frees + 2);
    CHECK_STATUS(lf_shared_cache_remove(name), LF_OK);
}

static void test_insert_get_pin_purge(void) {
    const char *name = name_for("basic");
    struct sctx *x = sctx_new();
    lf_shared_cache *c = make(name, 16u << 20, 8, x);
    lf_shared_stats s = stats_of(c);
    CHECK(s.entries == 0 && s.fills == 0 && s.processes == 1 && s.present_bytes == 0);
    CHECK(s.budget == 16u << 20); /* no budget: the capacity */

    const uint8_t *d = SENTINEL, *d2 = NULL;
    size_t len = 0;
    CHECK_STATUS(lf_shared_cache_get(c, 1, &d, &len), LF_NOT_FOUND);
    CHECK(strstr(lf_last_error_message(), "key 1") != NULL);
    CHECK(d == SENTINEL && len == 0);

    /* Lazy: nothing rebuilt until touched. */
    size_t n1 = 5 * CHUNK + 100;
    CHECK_STATUS(lf_shared_cache_insert(c, 1, n1, &d), LF_OK);
    REQUIRE(d != SENTINEL && d != NULL);
    CHECK(((uintptr_t)d & 4095) == 0);
    CHECK(atomic_load(&x->calls) == 0 && fills_of(c, 1) == 0);
    CHECK_STATUS(lf_shared_cache_get(c, 1, &d2, &len), LF_OK);
    CHECK(d2 == d && len == n1);
    CHECK_STATUS(lf_shared_cache_insert(c, 1, n1, &d2), LF_OK); /* there: the same entry */
    CHECK(d2 == d && stats_of(c).entries == 1);
    CHECK_STATUS(lf_shared_cache_insert(c, 1, n1 + 1, &d2), LF_SHARED_LENGTH_MISMATCH);
    CHECK(strstr(lf_last_error_message(), "key 1") != NULL);
    CHECK_STATUS(lf_shared_cache_insert(c, 2, 0, &d2), LF_INVALID_LENGTH);
    CHECK_STATUS(lf_shared_cache_insert(c, 2, (16u << 20) + 1, &d2), LF_INVALID_LENGTH);
    CHECK_STATUS(lf_shared_cache_insert(c, 2, SIZE_MAX, &d2), LF_INVALID_LENGTH);
    CHECK(d2 == d);

    /* Every byte, through the pointer: each chunk rebuilt once, on a worker thread. */
    CHECK(bytes_match(d, n1, 1));
    CHECK(d[n1] == 0); /* the rest of the last chunk reads as zeros */
    CHECK(atomic_load(&x->calls) == (int)chunks_of(n1));
    CHECK(atomic_load(&x->tid) != 0 && atomic_load(&x->tid) != my_tid());
    CHECK(fills_of(c, 1) == chunks_of(n1));
    CHECK(bytes_match(d, n1, 1));
    CHECK(atomic_load(&x->calls) == (int)chunks_of(n1)); /* resident: nothing rebuilt */
    s = stats_of(c);
    CHECK(s.fills == chunks_of(n1) && s.present_bytes == chunks_of(n1) * CHUNK);
    CHECK(s.failures == 0 && s.purged_chunks == 0);

    /* Pins nest; an unpin without a pin, or one too many, is LF_NOT_PINNED. */
    CHECK_STATUS(lf_shared_cache_unpin(c, 1), LF_NOT_PINNED);
    CHECK_STATUS(lf_shared_cache_unpin(c, 99), LF_NOT_FOUND);
    d2 = SENTINEL;
    CHECK_STATUS(lf_shared_cache_pin(c, 99, &d2, &len), LF_NOT_FOUND);
    CHECK(d2 == SENTINEL);
    CHECK_STATUS(lf_shared_cache_pin(c, 1, &d2, &len), LF_OK);
    CHECK(d2 == d && len == n1 && bytes_match(d2, len, 1));
    CHECK_STATUS(lf_shared_cache_pin(c, 1, &d2, NULL), LF_OK);
    size_t punched = 99;
    CHECK_STATUS(lf_shared_cache_purge(c, 0, &punched), LF_OK);
    CHECK(punched == 0); /* pinned twice */
    CHECK_STATUS(lf_shared_cache_unpin(c, 1), LF_OK);
    CHECK_STATUS(lf_shared_cache_purge(c, 0, &punched), LF_OK);
    CHECK(punched == 0); /* still pinned once */
    CHECK_STATUS(lf_shared_cache_unpin(c, 1), LF_OK);
    CHECK_STATUS(lf_shared_cache_unpin(c, 1), LF_NOT_PINNED); /* the double unpin */
    CHECK(strstr(lf_last_error_message(), "lf_shared_cache_unpin") != NULL);

    /* Unpinned: a purge punches every chunk, and the next pin rebuilds them on this thread. */
    CHECK_STATUS(lf_shared_cache_purge(c, 0, &punched), LF_OK);
    CHECK(punched == chunks_of(n1));
    s = stats_of(c);
    CHECK(s.present_bytes == 0 && s.purged_chunks == chunks_of(n1) && s.purges >= 1);
    CHECK_STATUS(lf_shared_cache_pin(c, 1, &d2, &len), LF_OK);
    CHECK(atomic_load(&x->tid) == my_tid());
    CHECK(atomic_load(&x->calls) == 2 * (int)chunks_of(n1));
    CHECK(fills_of(c, 1) == 2 * chunks_of(n1));
    CHECK(bytes_match(d2, len, 1));
    CHECK_STATUS(lf_shared_cache_unpin(c, 1), LF_OK);
    /* keep: a purge stops once the resident bytes fit. */
    CHECK_STATUS(lf_shared_cache_purge(c, 2 * CHUNK, &punched), LF_OK);
    CHECK(punched == chunks_of(n1) - 2 && stats_of(c).present_bytes == 2 * CHUNK);
    CHECK_STATUS(lf_shared_cache_purge(c, 2 * CHUNK, &punched), LF_OK);
    CHECK(punched == 0);

    /* A budget: the cache keeps its resident bytes under it as it rebuilds, and every byte is
     * still right. */
    size_t n2 = 12 * CHUNK;
    CHECK_STATUS(lf_shared_cache_insert(c, 2, n2, &d2), LF_OK);
    CHECK_STATUS(lf_shared_cache_set_budget(c, 3 * CHUNK), LF_OK);
    CHECK(stats_of(c).budget == 3 * CHUNK && stats_of(c).present_bytes <= 3 * CHUNK);
    CHECK(bytes_match(d2, n2, 2));
    /* The worker that rebuilt the last chunk purges after waking the reader: wait for it. */
    for (int i = 0; i < 2000 && stats_of(c).present_bytes > 3 * CHUNK; i++)
        usleep(1000);
    s = stats_of(c);
    CHECK(s.present_bytes <= 3 * CHUNK);
    CHECK(s.purged_chunks > chunks_of(n1) - 2 + chunks_of(n1));
    CHECK(bytes_match(d, n1, 1));
    CHECK_STATUS(lf_shared_cache_set_budget(c, 0), LF_OK); /* 0: none */
    CHECK(stats_of(c).budget == SIZE_MAX);
    CHECK(atomic_load(&x->bad_range) == 0);

    lf_shared_cache_free(c);
    CHECK_STATUS(lf_shared_cache_remove(name), LF_OK);
}

/* Records used up, then the capacity. */
static void test_full(void) {
    const char *name = name_for("full");
    struct sctx *x = sctx_new();
    lf_shared_cache *c = make(name, 8 * CHUNK, 4, x);
    for (uint64_t k = 0; k < 4; k++)
        CHECK_STATUS(lf_shared_cache_insert(c, k, 100, NULL), LF_OK);
    const uint8_t *d = SENTINEL;
    CHECK_STATUS(lf_shared_cache_insert(c, 4, 100, &d), LF_SHARED_FULL);
    CHECK(strstr(lf_last_error_message(), "entry records") != NULL && d == SENTINEL);
    lf_shared_cache_free(c);
    CHECK_STATUS(lf_shared_cache_remove(name), LF_OK);

    c = make(name, 8 * CHUNK, 16, x = sctx_new());
    CHECK_STATUS(lf_shared_cache_insert(c, 0, 6 * CHUNK, NULL), LF_OK);
    CHECK_STATUS(lf_shared_cache_insert(c, 1, 2 * CHUNK + 1, &d), LF_SHARED_FULL);
    CHECK(strstr(lf_last_error_message(), "capacity") != NULL && d == SENTINEL);
    CHECK_STATUS(lf_shared_cache_insert(c, 1, 2 * CHUNK, &d), LF_OK);
    CHECK(bytes_match(d, 2 * CHUNK, 1));
    lf_shared_cache_free(c);
    CHECK_STATUS(lf_shared_cache_remove(name), LF_OK);
}

/* Modes and options: a SIGBUS-mode process and a monitor-mode one on one cache; modes, huge
 * pages in SIGBUS mode and pressure windows out of range refused. */
static void test_modes_and_options(void) {
    lf_shared_config cfg = config_of(16 * CHUNK, 16);
    CHECK(cfg.mode == LF_MODE_MONITOR && !cfg.huge_pages && cfg.pressure_stall_us == 0 &&
          cfg.pressure_window_us == 0);
    const char *name = name_for("modes");
    struct sctx *x = sctx_new();
    lf_shared_cache *c = NULL;
    cfg.mode = LF_MODE_SIGBUS;
    CHECK_STATUS(lf_shared_cache_create(name, &cfg, regen, x, sctx_free, &c), LF_OK);
    const uint8_t *d = NULL;
    CHECK_STATUS(lf_shared_cache_insert(c, 5, 3 * CHUNK + 10, &d), LF_OK);
    CHECK(bytes_match(d, 3 * CHUNK + 10, 5)); /* rebuilt in this thread's SIGBUS handler */
    CHECK(fills_of(c, 5) == 4);
    struct sctx *y = sctx_new();
    lf_shared_cache *m = NULL;
    CHECK_STATUS(lf_shared_cache_open_in(name, LF_MODE_MONITOR, regen, y, sctx_free, &m), LF_OK);
    const uint8_t *e = NULL;
    size_t len = 0;
    CHECK_STATUS(lf_shared_cache_get(m, 5, &e, &len), LF_OK);
    CHECK(len == 3 * CHUNK + 10 && bytes_match(e, len, 5) && fills_of(m, 5) == 4);
    CHECK(atomic_load(&y->calls) == 0);
    lf_shared_cache *bad = SENTINEL;
    CHECK_STATUS(lf_shared_cache_open_in(name, (lf_mode)9, regen, y, NULL, &bad), LF_INVALID_CONFIG);
    CHECK_STATUS(lf_shared_cache_open_in(name, LF_MODE_EXPLICIT, regen, y, NULL, &bad),
                 LF_INVALID_CONFIG);
    CHECK_STATUS(lf_shared_cache_open_in(NULL, LF_MODE_SIGBUS, regen, y, NULL, &bad),
                 LF_NULL_ARGUMENT);
    CHECK(bad == SENTINEL);
    lf_shared_cache_free(m);
    lf_shared_cache_free(c);
    CHECK_STATUS(lf_shared_cache_remove(name), LF_OK);

    /* A cache without a name, opened again through its fd (as another process would). */
    struct sctx *z = sctx_new();
    lf_shared_config a = config_of(16 * CHUNK, 16);
    lf_shared_cache *anon = NULL;
    CHECK_STATUS(lf_shared_cache_create_anonymous(&a, regen, z, sctx_free, &anon), LF_OK);
    const uint8_t *ad = NULL;
    CHECK_STATUS(lf_shared_cache_insert(anon, 3, 2 * CHUNK, &ad), LF_OK);
    CHECK(bytes_match(ad, 2 * CHUNK, 3));
    int afd = -1;
    CHECK_STATUS(lf_shared_cache_fd(anon, &afd), LF_OK);
    CHECK(afd >= 0);
    struct sctx *w = sctx_new();
    lf_shared_cache *again = NULL;
    CHECK_STATUS(lf_shared_cache_open_fd(afd, LF_MODE_SIGBUS, regen, w, sctx_free, &again), LF_OK);
    const uint8_t *ad2 = NULL;
    size_t alen = 0;
    CHECK_STATUS(lf_shared_cache_get(again, 3, &ad2, &alen), LF_OK);
    CHECK(alen == 2 * CHUNK && bytes_match(ad2, alen, 3) && atomic_load(&w->calls) == 0);
    lf_shared_cache_free(again);
    lf_shared_cache_free(anon);
    bad = SENTINEL;
    CHECK_STATUS(lf_shared_cache_open_fd(-1, LF_MODE_MONITOR, regen, NULL, NULL, &bad),
                 LF_INVALID_CONFIG);
    int devnull = open("/dev/null", O_RDONLY);
    CHECK_STATUS(lf_shared_cache_open_fd(devnull, LF_MODE_MONITOR, regen, NULL, NULL, &bad),
                 LF_BAD_SHARED_FILE);
    close(devnull);
    a.huge_pages = true;
    CHECK_STATUS(lf_shared_cache_create_anonymous(&a, regen, NULL, NULL, &bad), LF_INVALID_CONFIG);
    CHECK(bad == SENTINEL);

    const char *other = name_for("options");
    lf_shared_config b = config_of(16 * CHUNK, 16);
    b.mode = LF_MODE_EXPLICIT;
    CHECK_STATUS(lf_shared_cache_create(other, &b, regen, NULL, NULL, &bad), LF_INVALID_CONFIG);
    b = config_of(16 * CHUNK, 16);
    b.mode = LF_MODE_SIGBUS;
    b.huge_pages = true;
    CHECK_STATUS(lf_shared_cache_create(other, &b, regen, NULL, NULL, &bad), LF_INVALID_CONFIG);
    b = config_of(16 * CHUNK, 16);
    b.pressure_stall_us = 10000;
    b.pressure_window_us = 100000; /* below 500 ms */
    CHECK_STATUS(lf_shared_cache_create(other, &b, regen, NULL, NULL, &bad), LF_INVALID_CONFIG);
    b.pressure_window_us = 2000000;
    b.pressure_stall_us = 3000000; /* above the window */
    CHECK_STATUS(lf_shared_cache_create(other, &b, regen, NULL, NULL, &bad), LF_INVALID_CONFIG);
    CHECK(bad == SENTINEL && !file_exists(other));
    b.pressure_stall_us = 100000;
    lf_status s = lf_shared_cache_create(other, &b, regen, NULL, NULL, &bad);
    if (s == LF_OK) {
        lf_shared_stats st = stats_of(bad);
        CHECK(st.pressure_purges == 0);
        lf_shared_cache_free(bad);
        CHECK_STATUS(lf_shared_cache_remove(other), LF_OK);
    } else {
        /* A kernel without PSI: the message says what is missing. */
        CHECK_STATUS(s, LF_KERNEL_ERROR);
        CHECK(strstr(lf_last_error_message(), "PSI") != NULL);
        printf("SKIPPED pressure trigger check: %s\n", lf_last_error_message());
    }
}

/* A callback that fails: the pin says so, the chunk reads as zeros and is marked failed; fixed,
 * a pin retries it. */
static void test_failing_callback(void) {
    const char *name = name_for("fail");
    struct sctx *x = sctx_new();
    lf_shared_cache *c = make(name, 16u << 20, 8, x);
    atomic_store(&x->fail_key, 7);
    size_t n = 3 * CHUNK;
    const uint8_t *d7 = NULL, *d8 = NULL, *d = SENTINEL;
    size_t len = 0;
    CHECK_STATUS(lf_shared_cache_insert(c, 7, n, &d7), LF_OK);
    CHECK_STATUS(lf_shared_cache_insert(c, 8, n, &d8), LF_OK);
    CHECK(!failed_of(c, 7));
    CHECK_STATUS(lf_shared_cache_pin(c, 7, &d, &len), LF_REGENERATE_FAILED);
    CHECK(strstr(lf_last_error_message(), "key 7") != NULL);
    CHECK(strstr(lf_last_error_message(), "returned 9") != NULL);
    CHECK(d == SENTINEL && len == 0);
    CHECK_STATUS(lf_shared_cache_unpin(c, 7), LF_NOT_PINNED); /* the failed pin pinned nothing */
    CHECK(failed_of(c, 7) && !failed_of(c, 8));
    CHECK(stats_of(c).failures >= 1);
    CHECK(d7[0] == 0 && d7[CHUNK - 1] == 0); /* the failed chunk reads as zeros */
    CHECK(failed_of(c, 7));
    CHECK(bytes_match(d8, n, 8)); /* the other entry is fine */
    CHECK(!failed_of(c, 8));
    bool f = false;
    CHECK_STATUS(lf_shared_cache_is_failed(c, 99, &f), LF_NOT_FOUND);
    uint64_t fills = 0;
    CHECK_STATUS(lf_shared_cache_fills(c, 99, &fills), LF_NOT_FOUND);

    /* Fixed: the next pin retries the failed chunk and the bytes are right. */
    atomic_store(&x->fail_key, -1);
    CHECK_STATUS(lf_shared_cache_pin(c, 7, &d, &len), LF_OK);
    CHECK(d == d7 && len == n && bytes_match(d, n, 7));
    CHECK(!failed_of(c, 7));
    CHECK_STATUS(lf_shared_cache_unpin(c, 7), LF_OK);
    lf_shared_cache_free(c);
    CHECK_STATUS(lf_shared_cache_remove(name), LF_OK);
}

/* Threads reading one entry at once, through the pointer and through pins: each chunk is
 * rebuilt once. */
struct reader {
    lf_shared_cache *c;
    uint64_t key;
    int pin;
    int ok;
};

static void *read_entry(void *p) {
    struct reader *r = p;
    const uint8_t *d = NULL;
    size_t len = 0;
    if (r->pin) {
        r->ok = lf_shared_cache_pin(r->c, r->key, &d, &len) == LF_OK && bytes_match(d, len, r->key) &&
                lf_shared_cache_unpin(r->c, r->key) == LF_OK;
    } else {
        r->ok = lf_shared_cache_get(r->c, r->key, &d, &len) == LF_OK && bytes_match(d, len, r->key);
    }
    return NULL;
}

static void test_threads(void) {
    const char *name = name_for("threads");
    struct sctx *x = sctx_new();
    lf_shared_cache *c = make(name, 16u << 20, 8, x);
    size_t n = 40 * CHUNK + 5;
    CHECK_STATUS(lf_shared_cache_insert(c, 5, n, NULL), LF_OK);
    struct reader r[6];
    pthread_t t[6];
    for (int i = 0; i < 6; i++) {
        r[i] = (struct reader){c, 5, i % 2, 0};
        REQUIRE(pthread_create(&t[i], NULL, read_entry, &r[i]) == 0);
    }
    for (int i = 0; i < 6; i++) {
        REQUIRE(pthread_join(t[i], NULL) == 0);
        CHECK(r[i].ok);
    }
    CHECK(fills_of(c, 5) == chunks_of(n));
    CHECK(atomic_load(&x->calls) == (int)chunks_of(n));
    lf_shared_cache_free(c);
    CHECK_STATUS(lf_shared_cache_remove(name), LF_OK);
}

/* ---- two processes ------------------------------------------------------------------------ */

#define KEYS 4

static size_t len_of(uint64_t key) {
    return (7 + 5 * key) * CHUNK + 1234 * key + 1;
}

static bool read_fd(int fd, void *buf, size_t n) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, (char *)buf + got, n - got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return false;
        got += (size_t)r;
    }
    return true;
}

static bool write_fd(int fd, const void *buf, size_t n) {
    return write(fd, buf, n) == (ssize_t)n;
}

/*
 * The forked child, before exec: the handle it inherited is the parent's. Every call gives
 * LF_FORKED_CHILD and writes no output; freeing it frees the child's copy only (no ctx_free).
 */
static void check_inherited_handle(lf_shared_cache *inherited) {
    int frees = atomic_load(&ctx_frees);
    const uint8_t *d = SENTINEL;
    size_t len = 7;
    uint64_t n = 7;
    bool f = true;
    lf_shared_stats st;
    CHECK_STATUS(lf_shared_cache_get(inherited, 0, &d, &len), LF_FORKED_CHILD);
    CHECK(strstr(lf_last_error_message(), "forked child") != NULL);
    CHECK(strstr(lf_last_error_message(), "lf_shared_cache_open()") != NULL);
    CHECK_STATUS(lf_shared_cache_insert(inherited, 0, len_of(0), &d), LF_FORKED_CHILD);
    CHECK_STATUS(lf_shared_cache_pin(inherited, 0, &d, &len), LF_FORKED_CHILD);
    CHECK_STATUS(lf_shared_cache_unpin(inherited, 0), LF_FORKED_CHILD);
    CHECK_STATUS(lf_shared_cache_is_failed(inherited, 0, &f), LF_FORKED_CHILD);
    CHECK_STATUS(lf_shared_cache_fills(inherited, 0, &n), LF_FORKED_CHILD);
    CHECK_STATUS(lf_shared_cache_purge(inherited, 0, &len), LF_FORKED_CHILD);
    CHECK_STATUS(lf_shared_cache_set_budget(inherited, 0), LF_FORKED_CHILD);
    CHECK_STATUS(lf_shared_cache_stats(inherited, &st), LF_FORKED_CHILD);
    CHECK(d == SENTINEL && len == 7 && n == 7 && f);
    lf_shared_cache_free(inherited);
    CHECK(atomic_load(&ctx_frees) == frees);
}

/*
 * The other process (this program run again as `shared_test reader NAME READY GO REPORT`): opens
 * the cache by name and reads every byte of every entry, the even keys through the pointer, the
 * odd ones through pins, at the same time as the parent. Reports its callback calls on REPORT.
 */
static int reader_main(char **argv) {
    const char *name = argv[2];
    int ready = atoi(argv[3]), go = atoi(argv[4]), report = atoi(argv[5]);
    struct sctx *x = sctx_new();
    lf_shared_cache *c = NULL;
    CHECK_STATUS(lf_shared_cache_open(name, regen, x, sctx_free, &c), LF_OK);
    if (c == NULL) {
        sctx_free(x);
        return 2;
    }
    lf_shared_stats st = stats_of(c);
    CHECK(st.processes == 2 && st.entries == KEYS);
    char byte = 'r';
    CHECK(write_fd(ready, &byte, 1));
    CHECK(read_fd(go, &byte, 1));
    for (uint64_t k = 0; k < KEYS; k++) {
        const uint8_t *d = NULL;
        size_t len = 0;
        if (k % 2 == 0) {
            CHECK_STATUS(lf_shared_cache_get(c, k, &d, &len), LF_OK);
            CHECK(len == len_of(k) && bytes_match(d, len, k));
        } else {
            CHECK_STATUS(lf_shared_cache_pin(c, k, &d, &len), LF_OK);
            CHECK(len == len_of(k) && bytes_match(d, len, k));
            CHECK_STATUS(lf_shared_cache_unpin(c, k), LF_OK);
        }
    }
    CHECK(atomic_load(&x->bad_range) == 0);
    int calls = atomic_load(&x->calls);
    CHECK(write_fd(report, &calls, sizeof calls));
    lf_shared_cache_free(c);
    CHECK(atomic_load(&ctx_frees) == 1);
    return failed == 0 ? 0 : 1;
}

/*
 * Two processes on one cache: the parent makes it, a forked child checks the handle it inherited
 * and runs this program again (exec: before it, a forked child of a process with threads may
 * only make async-signal-safe calls), which opens the cache by name; both read every byte at
 * once. The fills counted in the file equal the chunks: nothing was rebuilt twice.
 */
static void test_two_processes(void) {
    const char *name = name_for("fork");
    struct sctx *x = sctx_new();
    lf_shared_cache *c = make(name, 64u << 20, 16, x);
    size_t chunks = 0;
    for (uint64_t k = 0; k < KEYS; k++) {
        CHECK_STATUS(lf_shared_cache_insert(c, k, len_of(k), NULL), LF_OK);
        chunks += chunks_of(len_of(k));
    }
    /* One byte read here first: the cache's threads are up, and idle at the fork (a forked child
     * inherits the locks held by the parent's other threads at that instant, malloc's too). */
    const uint8_t *d = NULL;
    CHECK_STATUS(lf_shared_cache_get(c, 0, &d, NULL), LF_OK);
    CHECK(d[0] == pattern(0, 0));
    int ready[2], go[2], report[2];
    REQUIRE(pipe(ready) == 0 && pipe(go) == 0 && pipe(report) == 0);
    char fds[3][16];
    snprintf(fds[0], sizeof fds[0], "%d", ready[1]);
    snprintf(fds[1], sizeof fds[1], "%d", go[0]);
    snprintf(fds[2], sizeof fds[2], "%d", report[1]);
    char *args[] = {"shared_test", "reader", (char *)name, fds[0], fds[1], fds[2], NULL};
    int frees = atomic_load(&ctx_frees);
    int failed_before = failed;
    pid_t pid = fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
        alarm(60);
        check_inherited_handle(c);
        if (failed != failed_before)
            _exit(3);
        close(ready[0]);
        close(go[1]);
        close(report[0]);
        execv("/proc/self/exe", args);
        perror("shared_test: exec /proc/self/exe");
        _exit(4);
    }
    close(ready[1]);
    close(go[0]);
    close(report[1]);
    char byte = 0;
    CHECK(read_fd(ready[0], &byte, 1));
    CHECK(stats_of(c).processes == 2);
    /* Both processes read every byte at once: the parent from the last key down. */
    REQUIRE(write_fd(go[1], "g", 1));
    for (uint64_t k = KEYS; k-- > 0;) {
        size_t len = 0;
        CHECK_STATUS(lf_shared_cache_get(c, k, &d, &len), LF_OK);
        CHECK(len == len_of(k) && bytes_match(d, len, k));
    }
    int child_calls = -1;
    CHECK(read_fd(report[0], &child_calls, sizeof child_calls));
    int st = 0;
    while (waitpid(pid, &st, 0) < 0)
        REQUIRE(errno == EINTR);
    /* 3: the inherited handle's checks failed; 1 or 2: the reader's (stderr says which). */
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    if (!(WIFEXITED(st) && WEXITSTATUS(st) == 0))
        fprintf(stderr, "two processes: the child ended with status %#x\n", st);
    close(ready[0]);
    close(go[1]);
    close(report[0]);

    /* Each chunk rebuilt once across both processes, counted in the file. */
    lf_shared_stats s = stats_of(c);
    CHECK(s.fills == chunks);
    CHECK(child_calls >= 0 && (size_t)(child_calls + atomic_load(&x->calls)) == chunks);
    for (uint64_t k = 0; k < KEYS; k++)
        CHECK(fills_of(c, k) == chunks_of(len_of(k)));
    CHECK(s.processes == 1); /* the child closed its handle */
    CHECK(s.failures == 0 && s.purged_chunks == 0);
    CHECK(atomic_load(&ctx_frees) == frees); /* the child freed its own ctx, not ours */
    printf("two processes: %zu chunks, rebuilt %llu times (%d in the child, %d in the parent)\n",
           chunks, (unsigned long long)s.fills, child_calls, atomic_load(&x->calls));
    lf_shared_cache_free(c);
    CHECK(atomic_load(&ctx_frees) == frees + 1);
    CHECK_STATUS(lf_shared_cache_remove(name), LF_OK);
}

int main(int argc, char **argv) {
    if (argc == 6 && strcmp(argv[1], "reader") == 0)
        return reader_main(argv);
    alarm(300); /* a hang ends as SIGALRM */
    setvbuf(stdout, NULL, _IONBF, 0);
    main_pid = getpid();
    REQUIRE(atexit(remove_names) == 0);

    test_statuses();
    const char *probe_name = name_for("probe");
    lf_shared_cache *probe = NULL;
    struct sctx *x = sctx_new();
    lf_status s = lf_shared_cache_create(probe_name, NULL, regen, x, sctx_free, &probe);
    if (s == LF_USERFAULTFD_UNAVAILABLE || (s == LF_KERNEL_ERROR && access("/dev/shm", W_OK) != 0)) {
        printf("SKIPPED: no shared cache can be made here: %s\n", lf_last_error_message());
        sctx_free(x);
        return 77;
    }
    REQUIRE(s == LF_OK);
    lf_shared_cache_free(probe);
    CHECK_STATUS(lf_shared_cache_remove(probe_name), LF_OK);

    test_config_names_and_null_arguments();
    test_insert_get_pin_purge();
    test_full();
    test_failing_callback();
    test_threads();
    test_modes_and_options();
    test_two_processes();

    for (int i = 0; i < nnames; i++)
        CHECK(!file_exists(names[i])); /* every test removed its cache */
    printf("%d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
