/*
 * Unit tests of the C API in include/lazyfree.h, against the real kernel (MADV_PAGEOUT reclaim,
 * userfaultfd, threads). Built by examples/c/Makefile with -Wall -Wextra -Werror -pedantic and
 * ASAN+UBSAN, run by ffi/tests/c_abi.rs.
 *
 * Cases that end the process (a poisoned page raising SIGBUS, a debug build aborting on a
 * double release) run in a child: this program re-executes itself with the case's name as its
 * argument and checks how the child ended.
 *
 * Prints "N passed, N failed" last; exits 0 when nothing failed, 77 when userfaultfd is
 * unavailable here (with a SKIPPED line saying why).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <unistd.h>

#include "check.h"
#include "lazyfree.h"

#ifndef LF_TEST_DEBUG_LIB
#define LF_TEST_DEBUG_LIB 0
#endif

extern char **environ;

#define PAGE 4096u

/* ---- callbacks ---------------------------------------------------------------------------- */

/* The bytes of entry `seed` at `offset`: what every callback here produces. */
static uint8_t pattern(uint32_t seed, size_t offset) {
    uint64_t x = (uint64_t)offset * 0x9E3779B97F4A7C15ull ^ (uint64_t)seed * 0xD1B54A32D192ED03ull;
    return (uint8_t)(x >> 56);
}

struct ctx {
    uint32_t seed;
    atomic_int calls;
    atomic_int fail;      /* non-zero: the callback fails */
    atomic_int bad_range; /* a call outside the entry */
    atomic_long tid;      /* the thread of the last call */
    size_t len;
};

static long my_tid(void) {
    return (long)syscall(SYS_gettid);
}

static atomic_int ctx_frees;

static struct ctx *ctx_new(uint32_t seed, size_t len) {
    struct ctx *c = calloc(1, sizeof *c);
    REQUIRE(c != NULL);
    c->seed = seed;
    c->len = len;
    atomic_init(&c->calls, 0);
    atomic_init(&c->fail, 0);
    atomic_init(&c->bad_range, 0);
    atomic_init(&c->tid, 0);
    return c;
}

static void ctx_free(void *p) {
    atomic_fetch_add(&ctx_frees, 1);
    free(p);
}

static int regen(void *p, size_t offset, uint8_t *buf, size_t len) {
    struct ctx *c = p;
    atomic_fetch_add(&c->calls, 1);
    atomic_store(&c->tid, my_tid());
    if (offset % PAGE != 0 || len == 0 || offset + len > c->len)
        atomic_store(&c->bad_range, 1);
    if (atomic_load(&c->fail))
        return 7;
    for (size_t i = 0; i < len; i++)
        buf[i] = pattern(c->seed, offset + i);
    return 0;
}

/* Whether the entry reads as the pattern of `seed`, every byte. Reads the way code for
 * LF_MODE_AUTO must: through lf_entry_data(), or through a pin where that gives NULL (explicit
 * mode). */
static int entry_matches(lf_entry *e, uint32_t seed) {
    const uint8_t *d = lf_entry_data(e);
    size_t n = lf_entry_len(e);
    uint8_t *pinned = NULL;
    if (d == NULL) {
        if (lf_entry_pin(e, &pinned) != LF_OK)
            return 0;
        d = pinned;
    }
    int ok = 1;
    for (size_t i = 0; i < n && ok; i++)
        ok = d[i] == pattern(seed, i);
    if (pinned != NULL && lf_entry_unpin(e) != LF_OK)
        ok = 0;
    return ok;
}

static int entry_is_zero(const lf_entry *e) {
    const uint8_t *d = lf_entry_data(e);
    for (size_t i = 0; i < lf_entry_len(e); i++)
        if (d[i] != 0)
            return 0;
    return 1;
}

static lf_cache *cache_in(lf_mode mode, lf_failure_policy policy, size_t chunk, size_t budget) {
    lf_config cfg;
    REQUIRE(lf_config_default(&cfg) == LF_OK);
    cfg.mode = mode;
    cfg.on_failure = policy;
    cfg.fill_chunk = chunk;
    cfg.budget = budget;
    lf_cache *c = NULL;
    REQUIRE(lf_cache_new(&cfg, &c) == LF_OK);
    return c;
}

static lf_cache *cache_with(lf_failure_policy policy, size_t chunk, size_t budget) {
    return cache_in(LF_MODE_MONITOR, policy, chunk, budget);
}

static lf_entry *insert_lazy(lf_cache *c, uint64_t key, struct ctx *x) {
    lf_entry *e = NULL;
    REQUIRE(lf_cache_insert(c, key, x->len, regen, x, ctx_free, NULL, &e) == LF_OK);
    return e;
}

/* Inserts an entry whose bytes (the pattern of x->seed) are given at once. */
static lf_entry *insert_initial(lf_cache *c, uint64_t key, struct ctx *x) {
    uint8_t *bytes = malloc(x->len);
    REQUIRE(bytes != NULL);
    for (size_t i = 0; i < x->len; i++)
        bytes[i] = pattern(x->seed, i);
    lf_entry *e = NULL;
    lf_status s = lf_cache_insert(c, key, x->len, regen, x, ctx_free, bytes, &e);
    free(bytes);
    REQUIRE(s == LF_OK && e != NULL);
    return e;
}

/* Whether the running kernel is at least maj.min. */
static int kernel_at_least(int maj, int min) {
    struct utsname u;
    int a = 0, b = 0;
    if (uname(&u) != 0 || sscanf(u.release, "%d.%d", &a, &b) != 2)
        return 1;
    return a > maj || (a == maj && b >= min);
}

static lf_stats stats_of(const lf_cache *c) {
    lf_stats s;
    REQUIRE(lf_cache_stats(c, &s) == LF_OK);
    return s;
}

/* ---- tests -------------------------------------------------------------------------------- */

static void test_status_and_errors(void) {
    /* Before any failure on this thread the message is empty, never NULL. */
    CHECK(lf_last_error_message() != NULL && lf_last_error_message()[0] == '\0');
    CHECK(lf_version() != NULL && strlen(lf_version()) > 0);
    const char *unknown = lf_status_str((lf_status)999);
    CHECK(unknown != NULL && strstr(unknown, "unknown") != NULL);
    CHECK(strstr(lf_status_str((lf_status)-1), "unknown") != NULL);
    for (int s = LF_OK; s <= LF_ERROR; s++) {
        const char *str = lf_status_str((lf_status)s);
        CHECK(str != NULL && strlen(str) > 0 && strcmp(str, unknown) != 0);
    }
    CHECK(strcmp(lf_status_str(LF_OK), "success") == 0);
    CHECK(strcmp(lf_status_str(LF_NOT_FOUND), lf_status_str(LF_NULL_ARGUMENT)) != 0);
    /* Stable values: they are part of the ABI. */
    CHECK(LF_OK == 0 && LF_NULL_ARGUMENT == 1 && LF_INVALID_LENGTH == 2 && LF_NOT_FOUND == 4 &&
          LF_PANIC == 11 && LF_ERROR == 12);

    CHECK_STATUS(lf_config_default(NULL), LF_NULL_ARGUMENT);
    CHECK(strstr(lf_last_error_message(), "lf_config_default") != NULL);
    CHECK(strstr(lf_last_error_message(), "out") != NULL);
}

static void *fail_on_other_thread(void *arg) {
    (void)arg;
    lf_status s = lf_cache_get(NULL, 1, NULL);
    return (void *)(s == LF_NULL_ARGUMENT && strstr(lf_last_error_message(), "lf_cache_get") != NULL
                        ? (void *)1
                        : NULL);
}

static void test_last_error_is_per_thread(void) {
    CHECK_STATUS(lf_cache_remove(NULL, 1), LF_NULL_ARGUMENT);
    pthread_t t;
    void *ok = NULL;
    REQUIRE(pthread_create(&t, NULL, fail_on_other_thread, NULL) == 0);
    REQUIRE(pthread_join(t, &ok) == 0);
    CHECK(ok != NULL);
    /* The other thread's failure did not touch this thread's message. */
    CHECK(strstr(lf_last_error_message(), "lf_cache_remove") != NULL);
}

static void test_config(void) {
    lf_config cfg;
    CHECK_STATUS(lf_config_default(&cfg), LF_OK);
    CHECK(cfg.mode == LF_MODE_MONITOR);
    CHECK(cfg.on_failure == LF_FAILURE_POISON);
    CHECK(cfg.fill_chunk == 65536);
    CHECK(cfg.budget == 0);

    lf_cache *c = SENTINEL;
    CHECK_STATUS(lf_cache_new(NULL, NULL), LF_NULL_ARGUMENT);
    CHECK_STATUS(lf_cache_new(&cfg, NULL), LF_NULL_ARGUMENT);

    struct {
        const char *what;
        lf_config cfg;
        lf_status want;
    } bad[8];
    int n = 0;
    for (int i = 0; i < 8; i++)
        bad[i].cfg = cfg;
    bad[n].what = "mode 99", bad[n].cfg.mode = (lf_mode)99, bad[n++].want = LF_INVALID_CONFIG;
    bad[n].what = "mode -1", bad[n].cfg.mode = (lf_mode)-1, bad[n++].want = LF_INVALID_CONFIG;
    bad[n].what = "policy 5", bad[n].cfg.on_failure = (lf_failure_policy)5, bad[n++].want = LF_INVALID_CONFIG;
    bad[n].what = "chunk 0", bad[n].cfg.fill_chunk = 0, bad[n++].want = LF_INVALID_CONFIG;
    bad[n].what = "chunk 1 GiB", bad[n].cfg.fill_chunk = (size_t)1 << 30, bad[n++].want = LF_INVALID_CONFIG;
    bad[n].what = "budget 100", bad[n].cfg.budget = 100, bad[n++].want = LF_INVALID_CONFIG;
    for (int i = 0; i < n; i++) {
        c = SENTINEL;
        lf_status s = lf_cache_new(&bad[i].cfg, &c);
        if (s != bad[i].want)
            fprintf(stderr, "config %s: got %s\n", bad[i].what, lf_status_str(s));
        CHECK(s == bad[i].want);
        CHECK(c == SENTINEL); /* outputs only on success */
        CHECK(strlen(lf_last_error_message()) > 0);
    }

    /* Every chunk form works and rebuilds the same bytes. */
    size_t chunks[] = {LF_FILL_CHUNK_PAGE, 3 * PAGE + 1, LF_FILL_CHUNK_ENTRY};
    for (size_t i = 0; i < sizeof chunks / sizeof chunks[0]; i++) {
        lf_cache *k = cache_with(LF_FAILURE_POISON, chunks[i], 0);
        struct ctx *x = ctx_new(40 + (uint32_t)i, 9 * PAGE + 123);
        lf_entry *e = insert_lazy(k, 1, x);
        CHECK(entry_matches(e, x->seed));
        size_t dropped = 0;
        CHECK_STATUS(lf_entry_reclaim(e, &dropped), LF_OK);
        CHECK(dropped > 0);
        CHECK(entry_matches(e, x->seed));
        CHECK(atomic_load(&x->bad_range) == 0);
        if (chunks[i] == LF_FILL_CHUNK_ENTRY)
            CHECK(atomic_load(&x->calls) <= 2); /* one call per rebuild of the whole entry */
        lf_entry_release(e);
        lf_cache_free(k);
    }

    lf_cache_free(NULL); /* a no-op */
}

static void test_insert_bad_input(void) {
    lf_cache *c = cache_with(LF_FAILURE_POISON, 65536, 0);
    int frees = atomic_load(&ctx_frees);
    struct ctx *x = ctx_new(1, 3 * PAGE);
    lf_entry *e = SENTINEL;
    uint8_t initial[16] = {0};

    CHECK_STATUS(lf_cache_insert(NULL, 1, 4096, regen, x, ctx_free, NULL, &e), LF_NULL_ARGUMENT);
    CHECK(strstr(lf_last_error_message(), "cache") != NULL);
    CHECK_STATUS(lf_cache_insert(c, 1, 4096, NULL, x, ctx_free, NULL, &e), LF_NULL_ARGUMENT);
    CHECK(strstr(lf_last_error_message(), "regen") != NULL);
    CHECK_STATUS(lf_cache_insert(c, 1, 0, regen, x, ctx_free, NULL, &e), LF_INVALID_LENGTH);
    CHECK_STATUS(lf_cache_insert(c, 1, 0, regen, x, ctx_free, initial, &e), LF_INVALID_LENGTH);
    CHECK_STATUS(lf_cache_insert(c, 1, SIZE_MAX, regen, x, ctx_free, NULL, &e), LF_INVALID_LENGTH);
    CHECK_STATUS(lf_cache_insert(c, 1, SIZE_MAX, regen, x, ctx_free, initial, &e), LF_INVALID_LENGTH);
    CHECK_STATUS(lf_cache_insert(c, 1, SIZE_MAX / 2 + 1, regen, x, ctx_free, initial, &e),
                 LF_INVALID_LENGTH);
    CHECK_STATUS(lf_cache_insert(c, 1, (size_t)1 << 41, regen, x, ctx_free, NULL, &e),
                 LF_INVALID_LENGTH);
    CHECK(strstr(lf_last_error_message(), "lf_cache_insert") != NULL);
    /* Failed inserts wrote nothing and kept nothing: ctx is still ours, never freed. */
    CHECK(e == SENTINEL);
    CHECK(atomic_load(&ctx_frees) == frees);
    CHECK(atomic_load(&x->calls) == 0);
    CHECK(stats_of(c).entries == 0);

    /* The same ctx is then accepted, and freed once with the entry. */
    CHECK_STATUS(lf_cache_insert(c, 1, x->len, regen, x, ctx_free, NULL, NULL), LF_OK);
    CHECK(stats_of(c).entries == 1);
    CHECK_STATUS(lf_cache_remove(c, 1), LF_OK);
    CHECK(atomic_load(&ctx_frees) == frees + 1);
    lf_cache_free(c);
}

static void test_lazy_and_initial(void) {
    lf_cache *c = cache_with(LF_FAILURE_POISON, 65536, 0);

    /* Lazy: nothing is computed until touched. */
    struct ctx *lazy = ctx_new(2, 40 * PAGE + 17);
    lf_entry *e = insert_lazy(c, 10, lazy);
    CHECK(e != NULL);
    CHECK(atomic_load(&lazy->calls) == 0);
    CHECK(lf_entry_len(e) == 40 * PAGE + 17);
    CHECK(((uintptr_t)lf_entry_data(e) & (PAGE - 1)) == 0);
    CHECK(entry_matches(e, 2));
    CHECK(atomic_load(&lazy->calls) > 0);
    /* Monitor mode: the callback ran on a worker, not on the thread that read. */
    CHECK(atomic_load(&lazy->tid) != 0 && atomic_load(&lazy->tid) != my_tid());
    /* Bytes past the length in the last page read as zero. */
    CHECK(lf_entry_data(e)[lf_entry_len(e)] == 0);

    /* With initial bytes: resident at once, no callback until the kernel drops pages. */
    struct ctx *eager = ctx_new(3, 25 * PAGE);
    lf_entry *f = insert_initial(c, 11, eager);
    CHECK(entry_matches(f, 3));
    CHECK(atomic_load(&eager->calls) == 0);
    CHECK(lf_entry_resident_pages(f) == 25);

    /* Real reclaim, then every byte again: rebuilt by the callback. */
    size_t dropped = 0;
    CHECK_STATUS(lf_entry_reclaim(f, &dropped), LF_OK);
    CHECK(dropped > 0);
    CHECK(lf_entry_resident_pages(f) == 25 - dropped);
    CHECK(entry_matches(f, 3));
    CHECK(atomic_load(&eager->calls) > 0);
    CHECK_STATUS(lf_entry_reclaim(f, NULL), LF_OK); /* pages_dropped may be NULL */
    CHECK(entry_matches(f, 3));

    lf_stats s = stats_of(c);
    CHECK(s.entries == 2);
    CHECK(s.bytes == lazy->len + eager->len);
    CHECK(s.faults_handled > 0);
    CHECK(s.pages_regenerated >= dropped);
    CHECK(s.regenerate_calls == (uint64_t)(atomic_load(&lazy->calls) + atomic_load(&eager->calls)));
    CHECK(s.regenerate_failures == 0);
    CHECK(s.failed_entries == 0 && s.pinned_entries == 0);
    CHECK(s.uffd_kind != NULL && strlen(s.uffd_kind) > 0);
    uint64_t hist = 0;
    for (int i = 0; i < LF_LATENCY_BUCKETS; i++)
        hist += s.regenerate_latency[i];
    CHECK(hist == s.regenerate_calls);

    CHECK_STATUS(lf_cache_stats(NULL, &s), LF_NULL_ARGUMENT);
    CHECK_STATUS(lf_cache_stats(c, NULL), LF_NULL_ARGUMENT);
    CHECK(atomic_load(&lazy->bad_range) == 0 && atomic_load(&eager->bad_range) == 0);

    lf_entry_release(e);
    lf_entry_release(f);
    lf_cache_free(c);
}

static void test_get_remove_and_lifetime(void) {
    lf_cache *c = cache_with(LF_FAILURE_POISON, 65536, 0);
    int frees = atomic_load(&ctx_frees);
    struct ctx *x = ctx_new(4, 16 * PAGE);
    CHECK_STATUS(lf_cache_insert(c, 7, x->len, regen, x, ctx_free, NULL, NULL), LF_OK);

    lf_entry *e = SENTINEL;
    CHECK_STATUS(lf_cache_get(c, 8, &e), LF_NOT_FOUND); /* unknown key */
    CHECK(e == SENTINEL);
    CHECK(strstr(lf_last_error_message(), "8") != NULL);
    CHECK_STATUS(lf_cache_get(NULL, 7, &e), LF_NULL_ARGUMENT);
    CHECK_STATUS(lf_cache_get(c, 7, NULL), LF_NULL_ARGUMENT);
    CHECK_STATUS(lf_cache_get(c, 7, &e), LF_OK);
    REQUIRE(e != SENTINEL && e != NULL);
    lf_entry *e2 = NULL;
    CHECK_STATUS(lf_cache_get(c, 7, &e2), LF_OK);
    CHECK(e2 != e && lf_entry_data(e2) == lf_entry_data(e));

    CHECK_STATUS(lf_cache_remove(c, 8), LF_NOT_FOUND);
    CHECK_STATUS(lf_cache_remove(NULL, 7), LF_NULL_ARGUMENT);
    CHECK_STATUS(lf_cache_remove(c, 7), LF_OK);
    CHECK_STATUS(lf_cache_remove(c, 7), LF_NOT_FOUND);
    CHECK_STATUS(lf_cache_get(c, 7, &e2), LF_NOT_FOUND);
    CHECK(stats_of(c).entries == 0);

    /* Removed, but the handles keep it alive and rebuildable. */
    CHECK(atomic_load(&ctx_frees) == frees);
    CHECK(entry_matches(e, 4));
    size_t dropped = 0;
    CHECK_STATUS(lf_entry_reclaim(e, &dropped), LF_OK);
    CHECK(dropped > 0);
    CHECK(entry_matches(e2, 4));

    /* The cache may go first; entries outlive it. */
    lf_cache_free(c);
    CHECK_STATUS(lf_entry_reclaim(e2, &dropped), LF_OK);
    CHECK(entry_matches(e, 4));
    lf_entry_release(e);
    CHECK(atomic_load(&ctx_frees) == frees); /* e2 still holds it */
    CHECK(entry_matches(e2, 4));
    lf_entry_release(e2);
    CHECK(atomic_load(&ctx_frees) == frees + 1); /* last reference gone: freed once */

    lf_entry_release(NULL); /* a no-op */
}

static void test_ctx_free_on_replace_and_cache_free(void) {
    lf_cache *c = cache_with(LF_FAILURE_POISON, 65536, 0);
    int frees = atomic_load(&ctx_frees);
    struct ctx *a = ctx_new(5, PAGE);
    struct ctx *b = ctx_new(6, 2 * PAGE);
    struct ctx *d = ctx_new(7, 3 * PAGE);
    CHECK_STATUS(lf_cache_insert(c, 1, a->len, regen, a, ctx_free, NULL, NULL), LF_OK);
    CHECK_STATUS(lf_cache_insert(c, 1, b->len, regen, b, ctx_free, NULL, NULL), LF_OK);
    CHECK(atomic_load(&ctx_frees) == frees + 1); /* a: replaced, no handle left */
    lf_entry *e = NULL;
    CHECK_STATUS(lf_cache_get(c, 1, &e), LF_OK);
    CHECK(lf_entry_len(e) == 2 * PAGE && entry_matches(e, 6));
    CHECK_STATUS(lf_cache_insert(c, 2, d->len, regen, d, ctx_free, NULL, NULL), LF_OK);
    lf_cache_free(c);
    CHECK(atomic_load(&ctx_frees) == frees + 2); /* d went with the cache; b is held by e */
    lf_entry_release(e);
    CHECK(atomic_load(&ctx_frees) == frees + 3);

    /* ctx_free may be NULL: ctx then stays the caller's. */
    struct ctx own;
    memset(&own, 0, sizeof own);
    own.seed = 8;
    own.len = PAGE;
    c = cache_with(LF_FAILURE_POISON, 65536, 0);
    CHECK_STATUS(lf_cache_insert(c, 1, own.len, regen, &own, NULL, NULL, &e), LF_OK);
    CHECK(entry_matches(e, 8));
    lf_entry_release(e);
    lf_cache_free(c);
    CHECK(atomic_load(&ctx_frees) == frees + 3);
}

/* lf_cache_get_or_insert: made once, found after; the cache owns ctx on success either way (an
 * unused one is freed before the call returns); on failure the caller keeps it. */
static void test_get_or_insert(void) {
    lf_cache *c = cache_with(LF_FAILURE_POISON, 65536, 0);
    int frees = atomic_load(&ctx_frees);
    struct ctx *a = ctx_new(11, 3 * PAGE);
    struct ctx *b = ctx_new(12, 3 * PAGE);
    lf_entry *e1 = NULL, *e2 = NULL;
    CHECK_STATUS(lf_cache_get_or_insert(c, 5, a->len, regen, a, ctx_free, &e1), LF_OK);
    CHECK(atomic_load(&ctx_frees) == frees); /* a is the new entry's */
    CHECK_STATUS(lf_cache_get_or_insert(c, 5, b->len, regen, b, ctx_free, &e2), LF_OK);
    CHECK(atomic_load(&ctx_frees) == frees + 1); /* b was not needed: freed */
    CHECK(e1 != NULL && e2 != NULL && lf_entry_data(e1) == lf_entry_data(e2));
    CHECK(entry_matches(e2, 11));
    CHECK(stats_of(c).entries == 1);
    /* Bad input: nothing kept, ctx stays the caller's. */
    struct ctx *d = ctx_new(13, PAGE);
    lf_entry *e3 = SENTINEL;
    CHECK_STATUS(lf_cache_get_or_insert(c, 6, 0, regen, d, ctx_free, &e3), LF_INVALID_LENGTH);
    CHECK(e3 == SENTINEL);
    CHECK_STATUS(lf_cache_get_or_insert(NULL, 6, PAGE, regen, d, ctx_free, &e3), LF_NULL_ARGUMENT);
    CHECK_STATUS(lf_cache_get_or_insert(c, 6, PAGE, NULL, d, ctx_free, &e3), LF_NULL_ARGUMENT);
    CHECK(atomic_load(&ctx_frees) == frees + 1);
    ctx_free(d);
    lf_entry_release(e1);
    lf_entry_release(e2);
    lf_cache_free(c);
    CHECK(atomic_load(&ctx_frees) == frees + 3); /* a with the cache, d by us */
}

/* The keyed cache's function: entry `key` holds the pattern of seed `key`. */
static int keyed_regen(void *p, uint64_t key, size_t offset, uint8_t *buf, size_t len) {
    struct ctx *c = p;
    atomic_fetch_add(&c->calls, 1);
    if (offset % PAGE != 0 || len == 0)
        atomic_store(&c->bad_range, 1);
    if (atomic_load(&c->fail) == (int)key)
        return 9;
    for (size_t i = 0; i < len; i++)
        buf[i] = pattern((uint32_t)key, offset + i);
    return 0;
}

/* lf_cache_new_keyed: one function for every key. Lazy and initial entries are rebuilt from
 * their own key after a reclaim; get_or_insert_keyed finds them; a failure stays with its key;
 * ctx is freed once, with the last of the cache and its entries; bad input gets its status. */
static void test_keyed(lf_mode mode) {
    int frees = atomic_load(&ctx_frees);
    lf_config cfg;
    REQUIRE(lf_config_default(&cfg) == LF_OK);
    cfg.mode = mode;
    cfg.on_failure = LF_FAILURE_ZERO;
    struct ctx *k = ctx_new(0, 0);
    atomic_store(&k->fail, -1); /* the key that fails: none yet */
    lf_cache *c = SENTINEL;
    CHECK_STATUS(lf_cache_new_keyed(&cfg, NULL, k, ctx_free, &c), LF_NULL_ARGUMENT);
    CHECK(c == SENTINEL);
    CHECK_STATUS(lf_cache_new_keyed(&cfg, keyed_regen, k, ctx_free, NULL), LF_NULL_ARGUMENT);
    CHECK(atomic_load(&ctx_frees) == frees); /* failed: k is still ours */
    REQUIRE(lf_cache_new_keyed(&cfg, keyed_regen, k, ctx_free, &c) == LF_OK);

    lf_entry *e[6] = {0};
    for (uint64_t key = 0; key < 6; key++) {
        size_t len = (1 + key % 3) * PAGE + key;
        if (key % 2 == 0) {
            CHECK_STATUS(lf_cache_insert_keyed(c, key, len, NULL, &e[key]), LF_OK);
        } else {
            uint8_t *bytes = malloc(len);
            REQUIRE(bytes != NULL);
            for (size_t i = 0; i < len; i++)
                bytes[i] = pattern((uint32_t)key, i);
            CHECK_STATUS(lf_cache_insert_keyed(c, key, len, bytes, &e[key]), LF_OK);
            free(bytes);
        }
        REQUIRE(e[key] != NULL);
    }
    for (int round = 0; round < 2; round++) {
        for (uint64_t key = 0; key < 6; key++) {
            CHECK(entry_matches(e[key], (uint32_t)key));
            CHECK_STATUS(lf_entry_reclaim(e[key], NULL), LF_OK);
        }
    }
    lf_entry *found = NULL;
    CHECK_STATUS(lf_cache_get_or_insert_keyed(c, 4, 1, &found), LF_OK);
    CHECK(found != NULL && lf_entry_data(found) == lf_entry_data(e[4]));
    lf_entry_release(found);
    CHECK_STATUS(lf_cache_get_or_insert_keyed(c, 9, 2 * PAGE, &found), LF_OK);
    CHECK(found != NULL && entry_matches(found, 9));
    lf_entry_release(found);
    CHECK(stats_of(c).entries == 7);
    CHECK(atomic_load(&k->calls) > 0 && atomic_load(&k->bad_range) == 0);

    /* A failing key: its pin fails, the others' do not. */
    atomic_store(&k->fail, 2);
    CHECK_STATUS(lf_entry_reclaim(e[2], NULL), LF_OK);
    uint8_t *data = NULL;
    CHECK_STATUS(lf_entry_pin(e[2], &data), LF_REGENERATE_FAILED);
    CHECK_STATUS(lf_entry_pin(e[3], &data), LF_OK);
    CHECK_STATUS(lf_entry_unpin(e[3]), LF_OK);
    atomic_store(&k->fail, -1);
    /* Under LF_FAILURE_ZERO the failed chunk reads as zeros until a pin retries it. */
    CHECK_STATUS(lf_entry_pin(e[2], &data), LF_OK);
    CHECK_STATUS(lf_entry_unpin(e[2]), LF_OK);
    CHECK(entry_matches(e[2], 2));

    /* Bad input. */
    lf_entry *none = SENTINEL;
    CHECK_STATUS(lf_cache_insert_keyed(c, 20, 0, NULL, &none), LF_INVALID_LENGTH);
    CHECK_STATUS(lf_cache_get_or_insert_keyed(c, 20, 0, &none), LF_INVALID_LENGTH);
    CHECK_STATUS(lf_cache_insert_keyed(NULL, 20, PAGE, NULL, &none), LF_NULL_ARGUMENT);
    CHECK_STATUS(lf_cache_get_or_insert_keyed(NULL, 20, PAGE, &none), LF_NULL_ARGUMENT);
    CHECK(none == SENTINEL);
    lf_cache *plain = cache_in(mode, LF_FAILURE_ZERO, 65536, 0);
    CHECK_STATUS(lf_cache_insert_keyed(plain, 1, PAGE, NULL, &none), LF_NO_CACHE_REGEN);
    CHECK(strstr(lf_last_error_message(), "lf_cache_new_keyed()") != NULL);
    CHECK_STATUS(lf_cache_get_or_insert_keyed(plain, 1, PAGE, &none), LF_NO_CACHE_REGEN);
    CHECK(none == SENTINEL && stats_of(plain).entries == 0);
    lf_cache_free(plain);

    /* ctx lives on with an entry held after the cache is freed. */
    for (uint64_t key = 1; key < 6; key++)
        lf_entry_release(e[key]);
    lf_cache_free(c);
    CHECK(atomic_load(&ctx_frees) == frees);
    CHECK_STATUS(lf_entry_reclaim(e[0], NULL), LF_OK);
    CHECK(entry_matches(e[0], 0));
    lf_entry_release(e[0]);
    CHECK(atomic_load(&ctx_frees) == frees + 1);
}

static void test_pin(void) {
    lf_cache *c = cache_with(LF_FAILURE_POISON, 65536, 0);
    struct ctx *x = ctx_new(9, 12 * PAGE);
    lf_entry *e = insert_lazy(c, 1, x);
    uint8_t *data = SENTINEL;

    CHECK_STATUS(lf_entry_pin(NULL, &data), LF_NULL_ARGUMENT);
    CHECK_STATUS(lf_entry_pin(e, NULL), LF_NULL_ARGUMENT);
    CHECK(data == SENTINEL);
    CHECK_STATUS(lf_entry_unpin(NULL), LF_NULL_ARGUMENT);
    CHECK_STATUS(lf_entry_unpin(e), LF_NOT_PINNED);

    CHECK_STATUS(lf_entry_pin(e, &data), LF_OK);
    CHECK(data == lf_entry_data(e));
    CHECK(stats_of(c).pinned_entries == 1);
    CHECK(lf_entry_resident_pages(e) == 12);
    size_t dropped = 99;
    CHECK_STATUS(lf_entry_reclaim(e, &dropped), LF_OK);
    CHECK(dropped == 0); /* pinned pages stay */
    data[5] = (uint8_t)(pattern(9, 5) + 1); /* writable while pinned */
    CHECK(lf_entry_data(e)[5] == (uint8_t)(pattern(9, 5) + 1));
    data[5] = pattern(9, 5);

    /* Pins nest, and belong to the handle they were taken through. */
    uint8_t *again = NULL;
    CHECK_STATUS(lf_entry_pin(e, &again), LF_OK);
    lf_entry *other = NULL;
    CHECK_STATUS(lf_entry_clone(e, &other), LF_OK);
    CHECK_STATUS(lf_entry_unpin(other), LF_NOT_PINNED);
    CHECK_STATUS(lf_entry_unpin(e), LF_OK);
    CHECK(stats_of(c).pinned_entries == 1);
    CHECK_STATUS(lf_entry_unpin(e), LF_OK);
    CHECK(stats_of(c).pinned_entries == 0);
    CHECK_STATUS(lf_entry_unpin(e), LF_NOT_PINNED);
    CHECK_STATUS(lf_entry_reclaim(e, &dropped), LF_OK);
    CHECK(dropped > 0); /* volatile again */
    CHECK(entry_matches(other, 9));

    /* Releasing a handle ends its pins. */
    CHECK_STATUS(lf_entry_pin(other, &data), LF_OK);
    CHECK_STATUS(lf_entry_pin(other, &data), LF_OK);
    CHECK(stats_of(c).pinned_entries == 1);
    lf_entry_release(other);
    CHECK(stats_of(c).pinned_entries == 0);
    CHECK_STATUS(lf_entry_reclaim(e, &dropped), LF_OK);
    CHECK(dropped > 0);

    CHECK_STATUS(lf_entry_clone(NULL, &other), LF_NULL_ARGUMENT);
    CHECK_STATUS(lf_entry_clone(e, NULL), LF_NULL_ARGUMENT);
    lf_entry_release(e);
    lf_cache_free(c);
}

static void test_null_entry_queries(void) {
    CHECK(lf_entry_data(NULL) == NULL);
    CHECK(strstr(lf_last_error_message(), "lf_entry_data") != NULL);
    CHECK(lf_entry_len(NULL) == 0);
    CHECK(lf_entry_is_failed(NULL) == false);
    CHECK(lf_entry_resident_pages(NULL) == 0);
    size_t n = 5;
    CHECK_STATUS(lf_entry_reclaim(NULL, &n), LF_NULL_ARGUMENT);
    CHECK(n == 5);
}

static void test_callback_failure_zero_policy(void) {
    lf_cache *c = cache_with(LF_FAILURE_ZERO, 65536, 0);
    struct ctx *x = ctx_new(10, 20 * PAGE);
    atomic_store(&x->fail, 1);
    lf_entry *e = insert_lazy(c, 1, x);

    /* The read completes, with zeros, and the entry says it failed. */
    CHECK(entry_is_zero(e));
    CHECK(lf_entry_is_failed(e));
    lf_stats s = stats_of(c);
    CHECK(s.failed_entries == 1);
    CHECK(s.regenerate_failures > 0);
    CHECK(s.regenerate_failures == s.regenerate_calls);

    /* A pin reports the failure and pins nothing. */
    uint8_t *data = SENTINEL;
    CHECK_STATUS(lf_entry_pin(e, &data), LF_REGENERATE_FAILED);
    CHECK(data == SENTINEL);
    CHECK(strstr(lf_last_error_message(), "returned 7") != NULL);
    CHECK(stats_of(c).pinned_entries == 0);
    CHECK_STATUS(lf_entry_unpin(e), LF_NOT_PINNED);

    /* Once the callback works again, a pin retries and clears the mark. */
    atomic_store(&x->fail, 0);
    CHECK_STATUS(lf_entry_pin(e, &data), LF_OK);
    CHECK(!lf_entry_is_failed(e));
    CHECK(entry_matches(e, 10));
    CHECK_STATUS(lf_entry_unpin(e), LF_OK);
    CHECK(stats_of(c).failed_entries == 0);

    /* A failure after reclaim: only the dropped pages read as zeros. */
    size_t dropped = 0;
    CHECK_STATUS(lf_entry_reclaim(e, &dropped), LF_OK);
    CHECK(dropped > 0);
    atomic_store(&x->fail, 1);
    const uint8_t *d = lf_entry_data(e);
    volatile uint8_t sink = d[0];
    (void)sink;
    CHECK(lf_entry_is_failed(e));
    atomic_store(&x->fail, 0);
    lf_entry_release(e);
    lf_cache_free(c);
}

static void test_budget(void) {
    lf_cache *c = cache_with(LF_FAILURE_POISON, 65536, 2 * PAGE);
    struct ctx *a = ctx_new(11, PAGE), *b = ctx_new(12, PAGE), *d = ctx_new(13, PAGE);
    int frees = atomic_load(&ctx_frees);
    CHECK_STATUS(lf_cache_insert(c, 1, PAGE, regen, a, ctx_free, NULL, NULL), LF_OK);
    CHECK_STATUS(lf_cache_insert(c, 2, PAGE, regen, b, ctx_free, NULL, NULL), LF_OK);
    CHECK_STATUS(lf_cache_insert(c, 3, PAGE, regen, d, ctx_free, NULL, NULL), LF_OK);
    lf_stats s = stats_of(c);
    CHECK(s.entries == 2 && s.evictions == 1);
    lf_entry *e = SENTINEL;
    CHECK_STATUS(lf_cache_get(c, 1, &e), LF_NOT_FOUND); /* least recently used went */
    CHECK(atomic_load(&ctx_frees) == frees + 1);
    struct ctx *big = ctx_new(14, 3 * PAGE);
    CHECK_STATUS(lf_cache_insert(c, 4, big->len, regen, big, ctx_free, NULL, &e), LF_OVER_BUDGET);
    CHECK(e == SENTINEL);
    CHECK(strstr(lf_last_error_message(), "budget") != NULL);
    free(big);
    lf_cache_free(c);
    CHECK(atomic_load(&ctx_frees) == frees + 3);
}

/* A callback that reads another volatile entry (allowed: the monitor starts another worker). */
struct nested {
    const lf_entry *source;
};

static int regen_from_source(void *p, size_t offset, uint8_t *buf, size_t len) {
    const struct nested *n = p;
    const uint8_t *src = lf_entry_data(n->source);
    for (size_t i = 0; i < len; i++)
        buf[i] = (uint8_t)(src[offset + i] ^ 0x5a);
    return 0;
}

static void test_nested_read(lf_mode mode) {
    lf_cache *c = cache_in(mode, LF_FAILURE_POISON, 65536, 0);
    struct ctx *x = ctx_new(15, 32 * PAGE);
    lf_entry *src = insert_lazy(c, 1, x);
    struct nested n = {src};
    lf_entry *dst = NULL;
    CHECK_STATUS(lf_cache_insert(c, 2, x->len, regen_from_source, &n, NULL, NULL, &dst), LF_OK);
    size_t dropped = 0;
    CHECK_STATUS(lf_entry_reclaim(src, &dropped), LF_OK);
    const uint8_t *d = lf_entry_data(dst);
    int ok = 1;
    for (size_t i = 0; i < x->len; i++)
        ok &= d[i] == (uint8_t)(pattern(15, i) ^ 0x5a);
    CHECK(ok);
    CHECK_STATUS(lf_entry_reclaim(dst, &dropped), LF_OK);
    CHECK_STATUS(lf_entry_reclaim(src, NULL), LF_OK);
    ok = 1;
    for (size_t i = 0; i < x->len; i++)
        ok &= d[i] == (uint8_t)(pattern(15, i) ^ 0x5a);
    CHECK(ok);
    lf_entry_release(dst);
    lf_entry_release(src);
    lf_cache_free(c);
}

/* Threads reading, pinning and releasing their own handles of shared entries. */
#define THREADS 4
#define SHARED 6

struct worker {
    lf_cache *cache;
    int id;
    int ok;
};

static void *worker_main(void *p) {
    struct worker *w = p;
    w->ok = 1;
    for (int round = 0; round < 3; round++) {
        for (int k = 0; k < SHARED; k++) {
            lf_entry *e = NULL;
            if (lf_cache_get(w->cache, (uint64_t)k, &e) != LF_OK) {
                w->ok = 0;
                continue;
            }
            if ((k + w->id) % 3 == 0) {
                size_t dropped;
                if (lf_entry_reclaim(e, &dropped) != LF_OK)
                    w->ok = 0;
            }
            if (!entry_matches(e, 100 + (uint32_t)k))
                w->ok = 0;
            uint8_t *data;
            if ((k + round) % 2 == 0) {
                if (lf_entry_pin(e, &data) != LF_OK || data[100] != pattern(100 + (uint32_t)k, 100))
                    w->ok = 0;
                else if (lf_entry_unpin(e) != LF_OK)
                    w->ok = 0;
            }
            lf_entry_release(e);
        }
    }
    return NULL;
}

static void test_threads(lf_mode mode) {
    lf_cache *c = cache_in(mode, LF_FAILURE_POISON, 8 * PAGE, 0);
    for (int k = 0; k < SHARED; k++) {
        struct ctx *x = ctx_new(100 + (uint32_t)k, (size_t)(20 + k) * PAGE + 5);
        CHECK_STATUS(lf_cache_insert(c, (uint64_t)k, x->len, regen, x, ctx_free, NULL, NULL), LF_OK);
    }
    pthread_t t[THREADS];
    struct worker w[THREADS];
    for (int i = 0; i < THREADS; i++) {
        w[i].cache = c;
        w[i].id = i;
        REQUIRE(pthread_create(&t[i], NULL, worker_main, &w[i]) == 0);
    }
    for (int i = 0; i < THREADS; i++) {
        REQUIRE(pthread_join(t[i], NULL) == 0);
        CHECK(w[i].ok);
    }
    lf_stats s = stats_of(c);
    CHECK(s.pinned_entries == 0 && s.regenerate_failures == 0 && s.entries == SHARED);
    lf_cache_free(c);
}

static void test_sigbus_mode(void) {
    lf_cache *c = cache_in(LF_MODE_SIGBUS, LF_FAILURE_ZERO, 65536, 0);
    struct ctx *x = ctx_new(30, 24 * PAGE + 9);
    lf_entry *e = insert_lazy(c, 1, x);
    CHECK(entry_matches(e, 30));
    /* The callback ran on this thread, inside the SIGBUS handler. */
    CHECK(atomic_load(&x->tid) == my_tid());
    size_t dropped = 0;
    CHECK_STATUS(lf_entry_reclaim(e, &dropped), LF_OK);
    CHECK(dropped > 0);
    int calls = atomic_load(&x->calls);
    CHECK(entry_matches(e, 30));
    CHECK(atomic_load(&x->calls) > calls);
    lf_stats s = stats_of(c);
    CHECK(s.pages_regenerated >= dropped && s.faults_handled > 0);
    CHECK(!s.kernel_faults_handled);
    CHECK(atomic_load(&x->bad_range) == 0);

    /* Failure under LF_FAILURE_ZERO: zeros, a mark, and a pin that reports it. */
    CHECK_STATUS(lf_entry_reclaim(e, &dropped), LF_OK);
    atomic_store(&x->fail, 1);
    volatile uint8_t b = lf_entry_data(e)[0];
    CHECK(b == 0);
    CHECK(lf_entry_is_failed(e));
    uint8_t *data = SENTINEL;
    CHECK_STATUS(lf_entry_pin(e, &data), LF_REGENERATE_FAILED);
    CHECK(data == SENTINEL);
    atomic_store(&x->fail, 0);
    CHECK_STATUS(lf_entry_pin(e, &data), LF_OK);
    CHECK(!lf_entry_is_failed(e) && entry_matches(e, 30));
    CHECK_STATUS(lf_entry_unpin(e), LF_OK);
    lf_entry_release(e);
    lf_cache_free(c);
}

/* LF_MODE_EXPLICIT: no userfaultfd; bytes only through a pin, which rebuilds lost pages. */
static void test_explicit_mode(void) {
    lf_cache *c = cache_in(LF_MODE_EXPLICIT, LF_FAILURE_POISON, 4 * PAGE, 0);
    lf_stats s = stats_of(c);
    CHECK(s.mode == LF_MODE_EXPLICIT);
    CHECK(strcmp(s.uffd_kind, "none (explicit mode)") == 0);
    CHECK(!s.kernel_faults_handled);
    CHECK(lf_cache_fallback_reason(c) == NULL); /* configured, not a fallback */

    struct ctx *x = ctx_new(50, 40 * PAGE + 77);
    lf_entry *e = insert_lazy(c, 1, x);
    /* No pointer to unpinned bytes: they could read as zeros after a purge. */
    CHECK(lf_entry_data(e) == NULL);
    CHECK(strstr(lf_last_error_message(), "explicit mode") != NULL);
    CHECK(strstr(lf_last_error_message(), "lf_entry_pin") != NULL);
    CHECK(atomic_load(&x->calls) == 0); /* lazy: nothing computed yet */

    uint8_t *data = SENTINEL;
    CHECK_STATUS(lf_entry_pin(e, &data), LF_OK);
    CHECK(data != SENTINEL && data != NULL);
    CHECK(atomic_load(&x->tid) == my_tid()); /* the callback ran on the pinning thread */
    int ok = 1;
    for (size_t i = 0; i < x->len; i++)
        ok &= data[i] == pattern(50, i);
    CHECK(ok);
    CHECK(lf_entry_data(e) == NULL); /* pinned or not */
    CHECK_STATUS(lf_entry_unpin(e), LF_OK);

    /* Reclaim drops pages; the next pin rebuilds only the chunks holding them. */
    size_t dropped = 0;
    CHECK_STATUS(lf_entry_reclaim(e, &dropped), LF_OK);
    CHECK(dropped > 0);
    int calls = atomic_load(&x->calls);
    CHECK(entry_matches(e, 50));
    CHECK(atomic_load(&x->calls) > calls);
    CHECK(atomic_load(&x->bad_range) == 0);
    s = stats_of(c);
    CHECK(s.pages_regenerated >= dropped);
    CHECK(s.pinned_entries == 0);

    /* Present pages cost no callback: pin twice without a reclaim between. */
    calls = atomic_load(&x->calls);
    CHECK(entry_matches(e, 50));
    CHECK(atomic_load(&x->calls) == calls);

    /* A failing callback makes the pin fail; nothing is zero-filled or poisoned. */
    CHECK_STATUS(lf_entry_reclaim(e, &dropped), LF_OK);
    CHECK(dropped > 0);
    atomic_store(&x->fail, 1);
    data = SENTINEL;
    CHECK_STATUS(lf_entry_pin(e, &data), LF_REGENERATE_FAILED);
    CHECK(data == SENTINEL);
    CHECK(stats_of(c).pinned_entries == 0);
    atomic_store(&x->fail, 0);
    CHECK(entry_matches(e, 50)); /* a later pin retries */

    /* Initial bytes are kept as given (the first word of each page included). */
    struct ctx *y = ctx_new(51, 9 * PAGE);
    lf_entry *f = insert_initial(c, 2, y);
    CHECK(entry_matches(f, 51));
    CHECK(atomic_load(&y->calls) == 0);
    CHECK_STATUS(lf_entry_reclaim(f, &dropped), LF_OK);
    CHECK(dropped > 0);
    CHECK(entry_matches(f, 51));
    CHECK(atomic_load(&y->calls) > 0);

    lf_entry_release(f);
    lf_entry_release(e);
    lf_cache_free(c);
}

/* LF_MODE_AUTO: the monitor mode where a userfaultfd can be had (here), else explicit;
 * LAZYFREE_MODE decides for LF_MODE_AUTO caches only. */
static void test_auto_mode(void) {
    const char *saved = getenv("LAZYFREE_MODE");
    char *old = saved ? strdup(saved) : NULL;
    REQUIRE(unsetenv("LAZYFREE_MODE") == 0);

    lf_cache *c = cache_in(LF_MODE_AUTO, LF_FAILURE_POISON, 65536, 0);
    CHECK(stats_of(c).mode == LF_MODE_MONITOR);
    CHECK(lf_cache_fallback_reason(c) == NULL);
    struct ctx *x = ctx_new(60, 10 * PAGE);
    lf_entry *e = insert_lazy(c, 1, x);
    CHECK(lf_entry_data(e) != NULL);
    CHECK(entry_matches(e, 60));
    lf_entry_release(e);
    lf_cache_free(c);

    REQUIRE(setenv("LAZYFREE_MODE", "explicit", 1) == 0);
    c = cache_in(LF_MODE_AUTO, LF_FAILURE_POISON, 65536, 0);
    lf_stats s = stats_of(c);
    CHECK(s.mode == LF_MODE_EXPLICIT && !s.kernel_faults_handled);
    const char *why = lf_cache_fallback_reason(c);
    CHECK(why != NULL && strstr(why, "LAZYFREE_MODE=explicit") != NULL);
    x = ctx_new(61, 10 * PAGE);
    e = insert_lazy(c, 1, x);
    CHECK(lf_entry_data(e) == NULL);
    CHECK(entry_matches(e, 61)); /* through a pin */
    size_t dropped = 0;
    CHECK_STATUS(lf_entry_reclaim(e, &dropped), LF_OK);
    CHECK(dropped > 0);
    CHECK(entry_matches(e, 61));
    lf_entry_release(e);
    lf_cache_free(c);

    /* A mode set in the config wins over the variable. */
    c = cache_in(LF_MODE_MONITOR, LF_FAILURE_POISON, 65536, 0);
    CHECK(stats_of(c).mode == LF_MODE_MONITOR);
    lf_cache_free(c);

    /* A bad value is a config error for LF_MODE_AUTO, with the value named. */
    REQUIRE(setenv("LAZYFREE_MODE", "fastest", 1) == 0);
    lf_config cfg;
    REQUIRE(lf_config_default(&cfg) == LF_OK);
    cfg.mode = LF_MODE_AUTO;
    c = SENTINEL;
    CHECK_STATUS(lf_cache_new(&cfg, &c), LF_INVALID_CONFIG);
    CHECK(c == SENTINEL);
    CHECK(strstr(lf_last_error_message(), "fastest") != NULL);
    cfg.mode = LF_MODE_SIGBUS; /* ignored by the other modes */
    CHECK_STATUS(lf_cache_new(&cfg, &c), LF_OK);
    CHECK(c != SENTINEL && stats_of(c).mode == LF_MODE_SIGBUS);
    lf_cache_free(c);

    CHECK(lf_cache_fallback_reason(NULL) == NULL);
    CHECK(strstr(lf_last_error_message(), "lf_cache_fallback_reason") != NULL);

    if (old) {
        REQUIRE(setenv("LAZYFREE_MODE", old, 1) == 0);
        free(old);
    } else {
        REQUIRE(unsetenv("LAZYFREE_MODE") == 0);
    }
}

/* ---- cases run in a child ----------------------------------------------------------------- */

/*
 * The process forks while it holds a cache (of `mode`) with a live, read entry and a pinned
 * one. In the forked child every call on the parent's handles gives LF_FORKED_CHILD, releasing
 * and freeing them touches no entry memory and calls no ctx_free, and touching an entry's bytes
 * ends the child with SIGSEGV: never zeros. The parent's cache keeps working. Returns 0 when all
 * of that held (the grandchild's failures are printed on stderr).
 */
static int fork_case(lf_mode mode) {
    lf_cache *c = cache_in(mode, LF_FAILURE_POISON, 65536, 0);
    struct ctx *x = ctx_new(70, 8 * PAGE);
    lf_entry *e = insert_lazy(c, 1, x);
    struct ctx *y = ctx_new(71, 8 * PAGE);
    lf_entry *p = insert_lazy(c, 2, y);
    if (!entry_matches(e, 70))
        return 10;
    uint8_t *pinned = NULL;
    if (lf_entry_pin(p, &pinned) != LF_OK)
        return 11;
    /* The bytes the child will touch: a pinned entry's (resident, non-volatile in the parent). */
    volatile const uint8_t *touch = pinned;
    int frees = atomic_load(&ctx_frees);

    pid_t pid = fork();
    if (pid < 0)
        return 12;
    if (pid == 0) {
        int bad = 0;
#define FORK_CHECK(cond)                                                                   \
    do {                                                                                   \
        if (!(cond)) {                                                                     \
            bad = 1;                                                                       \
            fprintf(stderr, "fork child: FAILED %s:%d: %s (last error: %s)\n", __FILE__,   \
                    __LINE__, #cond, lf_last_error_message());                            \
        }                                                                                  \
    } while (0)
        lf_entry *g = SENTINEL;
        uint8_t *d = SENTINEL;
        size_t dropped = 5;
        lf_stats st;
        FORK_CHECK(lf_cache_get(c, 1, &g) == LF_FORKED_CHILD && g == SENTINEL);
        FORK_CHECK(strstr(lf_last_error_message(), "forked child") != NULL);
        FORK_CHECK(lf_cache_insert(c, 3, PAGE, regen, x, NULL, NULL, &g) == LF_FORKED_CHILD);
        FORK_CHECK(lf_cache_remove(c, 1) == LF_FORKED_CHILD);
        FORK_CHECK(lf_cache_stats(c, &st) == LF_FORKED_CHILD);
        FORK_CHECK(lf_entry_pin(e, &d) == LF_FORKED_CHILD && d == SENTINEL);
        FORK_CHECK(lf_entry_unpin(p) == LF_FORKED_CHILD);
        FORK_CHECK(lf_entry_reclaim(e, &dropped) == LF_FORKED_CHILD && dropped == 5);
        lf_config cfg;
        FORK_CHECK(lf_config_default(&cfg) == LF_OK);
        cfg.mode = mode;
        lf_cache *n = SENTINEL;
        FORK_CHECK(lf_cache_new(&cfg, &n) == LF_FORKED_CHILD && n == SENTINEL);
        FORK_CHECK(lf_cache_new_keyed(&cfg, keyed_regen, x, NULL, &n) == LF_FORKED_CHILD &&
                   n == SENTINEL);
        FORK_CHECK(lf_cache_get_or_insert(c, 1, PAGE, regen, x, NULL, &g) == LF_FORKED_CHILD);
        FORK_CHECK(lf_cache_insert_keyed(c, 4, PAGE, NULL, &g) == LF_FORKED_CHILD);
        FORK_CHECK(lf_cache_get_or_insert_keyed(c, 1, PAGE, &g) == LF_FORKED_CHILD && g == SENTINEL);
        FORK_CHECK(lf_entry_len(e) == 8 * PAGE); /* the handle itself is readable */
        /* Releasing and freeing the child's copies: no memory touched, no ctx_free. */
        lf_entry_release(e);
        lf_entry_release(p);
        lf_cache_free(c);
        FORK_CHECK(atomic_load(&ctx_frees) == frees);
        if (bad)
            _exit(20);
        fprintf(stderr, "fork child: touching entry memory\n");
        uint8_t b = touch[0]; /* SIGSEGV here: not mapped in the child */
        fprintf(stderr, "fork child: read %u from entry memory instead of SIGSEGV\n", b);
        _exit(21);
#undef FORK_CHECK
    }
    int st = 0;
    while (waitpid(pid, &st, 0) < 0)
        if (errno != EINTR)
            return 13;
    int rc = 0;
    if (!(WIFSIGNALED(st) && WTERMSIG(st) == SIGSEGV)) {
        fprintf(stderr, "fork child ended with status %#x, want SIGSEGV\n", st);
        rc = 14;
    }
    /* The parent's cache is untouched by the child's releases and keeps rebuilding. */
    if (lf_entry_unpin(p) != LF_OK)
        rc = 15;
    size_t dropped = 0;
    if (lf_entry_reclaim(e, &dropped) != LF_OK || dropped == 0 || !entry_matches(e, 70) ||
        !entry_matches(p, 71)) {
        fprintf(stderr, "parent's cache after the fork: %s\n", lf_last_error_message());
        rc = 16;
    }
    lf_entry_release(e);
    lf_entry_release(p);
    lf_cache_free(c);
    if (atomic_load(&ctx_frees) != frees + 2)
        rc = 17;
    return rc;
}

static int child_case(const char *name) {
    alarm(60); /* a hang ends as SIGALRM, not as a stuck test run */
    if (strcmp(name, "poison") == 0 || strcmp(name, "poison-sigbus") == 0) {
        lf_mode mode = strcmp(name, "poison") == 0 ? LF_MODE_MONITOR : LF_MODE_SIGBUS;
        lf_cache *c = cache_in(mode, LF_FAILURE_POISON, 65536, 0);
        if (!stats_of(c).poison_supported) {
            fprintf(stderr, "no UFFDIO_POISON on this kernel\n");
            return 77;
        }
        struct ctx *x = ctx_new(20, 4 * PAGE);
        atomic_store(&x->fail, 1);
        lf_entry *e = insert_lazy(c, 1, x);
        volatile uint8_t b = lf_entry_data(e)[PAGE]; /* SIGBUS (SIGSEGV before 6.6) here */
        (void)b;
        fprintf(stderr, "read a poisoned page without SIGBUS\n");
        return 3;
    }
    if (strcmp(name, "fork-monitor") == 0 || strcmp(name, "fork-explicit") == 0)
        return fork_case(strcmp(name, "fork-monitor") == 0 ? LF_MODE_MONITOR : LF_MODE_EXPLICIT);
    lf_cache *c = cache_with(LF_FAILURE_POISON, 65536, 0);
    struct ctx *x = ctx_new(21, PAGE);
    lf_entry *e = insert_lazy(c, 1, x);
    if (strcmp(name, "double-release") == 0) {
        lf_entry_release(e);
        lf_entry_release(e); /* a debug build aborts here */
    } else if (strcmp(name, "use-after-release") == 0) {
        lf_entry_release(e);
        fprintf(stderr, "len %zu\n", lf_entry_len(e)); /* a debug build aborts here */
    } else if (strcmp(name, "double-free-cache") == 0) {
        lf_entry_release(e);
        lf_cache_free(c);
        lf_cache_free(c); /* a debug build aborts here */
    } else {
        fprintf(stderr, "unknown case %s\n", name);
        return 2;
    }
    fprintf(stderr, "misuse went unnoticed\n");
    return 4;
}

/* Runs this program with `name` as argument; returns its wait status, its stderr in `err`. */
static int run_child(const char *self, const char *name, char *err, size_t errlen) {
    int pipefd[2];
    REQUIRE(pipe(pipefd) == 0);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, pipefd[1], 2);
    posix_spawn_file_actions_addclose(&fa, pipefd[0]);

    /* The child's own environment: ASAN must let SIGBUS and SIGSEGV kill it, as they would
     * kill a program. */
    size_t n = 0;
    while (environ[n])
        n++;
    char **env = calloc(n + 2, sizeof *env);
    REQUIRE(env != NULL);
    static char asan[512];
    const char *old = getenv("ASAN_OPTIONS");
    snprintf(asan, sizeof asan, "ASAN_OPTIONS=%s%shandle_sigbus=0:handle_segv=0:handle_abort=0",
             old ? old : "", old && *old ? ":" : "");
    size_t m = 0;
    for (size_t i = 0; i < n; i++)
        if (strncmp(environ[i], "ASAN_OPTIONS=", 13) != 0)
            env[m++] = environ[i];
    env[m++] = asan;
    env[m] = NULL;

    char *argv[] = {(char *)self, (char *)name, NULL};
    pid_t pid;
    int rc = posix_spawn(&pid, self, &fa, NULL, argv, env);
    posix_spawn_file_actions_destroy(&fa);
    free(env);
    close(pipefd[1]);
    REQUIRE(rc == 0);
    size_t got = 0;
    ssize_t r;
    while ((r = read(pipefd[0], err + got, errlen - 1 - got)) > 0 || (r < 0 && errno == EINTR))
        if (r > 0)
            got += (size_t)r;
    err[got] = '\0';
    close(pipefd[0]);
    int status = 0;
    while (waitpid(pid, &status, 0) < 0)
        REQUIRE(errno == EINTR);
    return status;
}

static void test_children(const char *self) {
    static char err[16384];
    const char *poison[] = {"poison", "poison-sigbus"};
    for (size_t i = 0; i < sizeof poison / sizeof poison[0]; i++) {
        int st = run_child(self, poison[i], err, sizeof err);
        /* Monitor mode before Linux 6.6 (no UFFDIO_POISON): the failed pages are made
         * inaccessible instead, and the touch dies of SIGSEGV. */
        int want = (i == 0 && !kernel_at_least(6, 6)) ? SIGSEGV : SIGBUS;
        if (WIFEXITED(st) && WEXITSTATUS(st) == 77) {
            printf("SKIPPED %s: %s", poison[i], err);
        } else {
            CHECK(WIFSIGNALED(st) && WTERMSIG(st) == want);
            if (!(WIFSIGNALED(st) && WTERMSIG(st) == want))
                fprintf(stderr, "%s child: status %#x, stderr:\n%s\n", poison[i], st, err);
        }
    }

    const char *forks[] = {"fork-monitor", "fork-explicit"};
    for (size_t i = 0; i < sizeof forks / sizeof forks[0]; i++) {
        int st = run_child(self, forks[i], err, sizeof err);
        /* Exit 0: the grandchild died of SIGSEGV; the marker: at the touch, not before it. */
        int ok = WIFEXITED(st) && WEXITSTATUS(st) == 0 && strstr(err, "touching entry memory");
        CHECK(ok);
        if (!ok)
            fprintf(stderr, "%s child: status %#x, stderr:\n%s\n", forks[i], st, err);
    }

    const char *misuse[] = {"double-release", "use-after-release", "double-free-cache"};
    for (size_t i = 0; i < sizeof misuse / sizeof misuse[0]; i++) {
        if (!LF_TEST_DEBUG_LIB) {
            printf("SKIPPED %s: the library is a release build, where this is undefined "
                   "behaviour and not checked\n",
                   misuse[i]);
            continue;
        }
        int st = run_child(self, misuse[i], err, sizeof err);
        int aborted = WIFSIGNALED(st) && WTERMSIG(st) == SIGABRT;
        CHECK(aborted);
        CHECK(strstr(err, "Aborting (debug build check)") != NULL);
        CHECK(strstr(err, "already released") != NULL);
        if (!aborted || strstr(err, "already released") == NULL)
            fprintf(stderr, "%s child: status %#x, stderr:\n%s\n", misuse[i], st, err);
    }
}

int main(int argc, char **argv) {
    if (argc == 2)
        return child_case(argv[1]);
    alarm(300); /* a hang ends as SIGALRM */
    setvbuf(stdout, NULL, _IONBF, 0);

    test_status_and_errors(); /* first: checks the empty message before any failure */
    lf_cache *probe = NULL;
    lf_status s = lf_cache_new(NULL, &probe);
    if (s == LF_USERFAULTFD_UNAVAILABLE) {
        printf("SKIPPED: userfaultfd unavailable here: %s\n", lf_last_error_message());
        return 77;
    }
    REQUIRE(s == LF_OK);
    lf_cache_free(probe);

    test_last_error_is_per_thread();
    test_config();
    test_insert_bad_input();
    test_lazy_and_initial();
    test_get_remove_and_lifetime();
    test_ctx_free_on_replace_and_cache_free();
    test_get_or_insert();
    test_keyed(LF_MODE_MONITOR);
    test_keyed(LF_MODE_SIGBUS);
    test_keyed(LF_MODE_EXPLICIT);
    test_pin();
    test_null_entry_queries();
    test_callback_failure_zero_policy();
    test_budget();
    test_nested_read(LF_MODE_MONITOR);
    test_threads(LF_MODE_MONITOR);
    test_sigbus_mode();
    test_nested_read(LF_MODE_SIGBUS);
    test_threads(LF_MODE_SIGBUS);
    test_explicit_mode();
    test_auto_mode();
    test_threads(LF_MODE_EXPLICIT);
    test_children("/proc/self/exe");

    printf("%d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
