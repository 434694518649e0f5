/*
 * png_cache: a small image cache on lazyfree. Each PNG is decoded to RGBA once and kept in a
 * volatile entry; the kernel may drop its pages whenever it needs memory, and the entry's
 * callback rebuilds them by decoding the PNG again, only as far as the rows it is asked for.
 *
 * The program decodes every file once (the reference checksum), inserts it, has the kernel
 * reclaim the entries (the real reclaim path), reads every pixel again, compares checksums and
 * prints the cache's statistics. Exit status 0 when every image came back intact.
 *
 *   png_cache [--mode=monitor|sigbus|explicit|auto] [file.png ...]
 *       default mode: monitor (callbacks run on lazyfree's worker threads); sigbus: callbacks
 *       run on the thread that reads the pixels, inside lazyfree's SIGBUS handler; explicit: no
 *       userfaultfd, pixels are read through a pin, which rebuilds what the kernel dropped;
 *       auto: monitor where a userfaultfd can be had, else explicit (LAZYFREE_MODE=explicit
 *       forces it). The program reads the way code for auto must: lf_entry_data(), and a pin
 *       where that returns NULL.
 *       default files: every PNG in $PNG_CACHE_DIR, or where that is unset, in
 *       /usr/share/backgrounds/sway (Debian package sway-backgrounds)
 *
 * Build: make -C examples/c (static and shared), see the Makefile.
 */
#define _DEFAULT_SOURCE
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lazyfree.h"
#include "png_decode.h"

/* The context of one entry: everything its callback needs to decode it again. */
struct image {
    char *path;
    uint32_t width, height;
    size_t bytes;         /* width * height * 4 */
    uint64_t checksum;    /* of the first decode */
    atomic_uint decodes;  /* callback calls */
};

static atomic_int images_freed;

/* The entry's callback: decodes the rows holding [offset, offset + len). */
static int regen_png(void *ctx, size_t offset, uint8_t *buf, size_t len) {
    struct image *img = ctx;
    char err[512];
    atomic_fetch_add(&img->decodes, 1);
    if (decode(img->path, offset, buf, len, NULL, NULL, err, sizeof err) != 0) {
        fprintf(stderr, "png_cache: regenerate failed: %s\n", err);
        return 1;
    }
    return 0;
}

static void free_image(void *ctx) {
    struct image *img = ctx;
    free(img->path);
    free(img);
    atomic_fetch_add(&images_freed, 1);
}

/* ---- main --------------------------------------------------------------------------------- */

static int fail_lf(const char *what, lf_status s) {
    fprintf(stderr, "png_cache: %s: %s: %s\n", what, lf_status_str(s), lf_last_error_message());
    return 2;
}

static const char *mode_name(lf_mode m) {
    switch (m) {
    case LF_MODE_MONITOR:
        return "monitor";
    case LF_MODE_SIGBUS:
        return "sigbus";
    case LF_MODE_EXPLICIT:
        return "explicit";
    case LF_MODE_AUTO:
        return "auto";
    }
    return "unknown";
}

/*
 * The checksum of every pixel of an entry. Where lf_entry_data() gives the bytes (a userfaultfd
 * mode) they are read directly; where it gives NULL (explicit mode, or auto that fell back to
 * it) they are reachable only through a pin. Returns 0, or the failed pin's status.
 */
static lf_status checksum_entry(lf_entry *e, uint64_t *sum) {
    const uint8_t *px = lf_entry_data(e);
    if (px != NULL) {
        *sum = fnv1a(px, lf_entry_len(e));
        return LF_OK;
    }
    uint8_t *pinned = NULL;
    lf_status s = lf_entry_pin(e, &pinned);
    if (s != LF_OK)
        return s;
    *sum = fnv1a(pinned, lf_entry_len(e));
    return lf_entry_unpin(e);
}

int main(int argc, char **argv) {
    size_t n = 0;
    char **paths = NULL;
    int own_paths = 0;
    lf_mode mode = LF_MODE_MONITOR;
    int first = 1;
    if (argc > 1 && strncmp(argv[1], "--mode=", 7) == 0) {
        const lf_mode modes[] = {LF_MODE_MONITOR, LF_MODE_SIGBUS, LF_MODE_EXPLICIT, LF_MODE_AUTO};
        size_t m = 0;
        while (m < sizeof modes / sizeof modes[0] && strcmp(argv[1] + 7, mode_name(modes[m])) != 0)
            m++;
        if (m == sizeof modes / sizeof modes[0]) {
            fprintf(stderr, "png_cache: unknown %s (monitor, sigbus, explicit or auto)\n", argv[1]);
            return 2;
        }
        mode = modes[m];
        first = 2;
    }
    if (argc > first) {
        paths = argv + first;
        n = (size_t)(argc - first);
    } else {
        const char *dir = getenv("PNG_CACHE_DIR");
        if (dir == NULL || *dir == '\0')
            dir = DEFAULT_DIR;
        paths = pngs_in(dir, &n);
        own_paths = 1;
        if (paths == NULL || n == 0) {
            fprintf(stderr,
                    "png_cache: no PNG files in %s: install the Debian package "
                    "sway-backgrounds, set PNG_CACHE_DIR, or name PNG files on the command line\n",
                    dir);
            return 2;
        }
    }

    lf_config cfg;
    lf_status s = lf_config_default(&cfg);
    if (s != LF_OK)
        return fail_lf("lf_config_default", s);
    /* Each callback call decodes from the top of the image down to its last row: larger chunks
     * mean fewer decodes per image. */
    cfg.fill_chunk = 1 << 20;
    cfg.mode = mode;
    /* A file that disappears reads as zeros and marks its entry failed, instead of SIGBUS (in
     * explicit mode the pin fails instead). */
    cfg.on_failure = LF_FAILURE_ZERO;
    lf_cache *cache = NULL;
    if ((s = lf_cache_new(&cfg, &cache)) != LF_OK)
        return fail_lf("lf_cache_new", s);

    struct image **imgs = calloc(n, sizeof *imgs);
    lf_entry **entries = calloc(n, sizeof *entries);
    if (imgs == NULL || entries == NULL)
        return 2;
    int status = 0;
    size_t inserted = 0;
    for (size_t i = 0; i < n; i++) {
        char err[512];
        struct image *img = calloc(1, sizeof *img);
        if (img == NULL || (img->path = strdup(paths[i])) == NULL)
            return 2;
        atomic_init(&img->decodes, 0);
        if (decode(img->path, 0, NULL, 0, &img->width, &img->height, err, sizeof err) != 0) {
            fprintf(stderr, "png_cache: %s\n", err);
            free_image(img);
            status = 2;
            continue;
        }
        img->bytes = (size_t)img->width * img->height * 4;
        uint8_t *pixels = malloc(img->bytes);
        if (pixels == NULL ||
            decode(img->path, 0, pixels, img->bytes, NULL, NULL, err, sizeof err) != 0) {
            fprintf(stderr, "png_cache: %s\n", pixels ? err : "out of memory");
            free(pixels);
            free_image(img);
            status = 2;
            continue;
        }
        img->checksum = fnv1a(pixels, img->bytes);
        /* The first decode goes in as the entry's bytes; the callback rebuilds what the kernel
         * drops. The cache owns img from here: free_image runs when the entry is gone. */
        s = lf_cache_insert(cache, i, img->bytes, regen_png, img, free_image, pixels,
                            &entries[inserted]);
        free(pixels);
        if (s != LF_OK) {
            free_image(img);
            status = fail_lf("lf_cache_insert", s);
            continue;
        }
        imgs[inserted++] = img;
        printf("%-60s %5u x %-5u %9zu bytes  checksum %016llx\n", img->path, img->width,
               img->height, img->bytes, (unsigned long long)img->checksum);
    }

    size_t dropped_total = 0;
    for (size_t i = 0; i < inserted; i++) {
        size_t dropped = 0;
        if ((s = lf_entry_reclaim(entries[i], &dropped)) != LF_OK)
            status = fail_lf("lf_entry_reclaim", s);
        dropped_total += dropped;
    }
    printf("reclaim: %zu pages (%zu KiB) dropped by the kernel\n", dropped_total,
           dropped_total * 4);

    size_t good = 0;
    for (size_t i = 0; i < inserted; i++) {
        uint64_t sum = 0;
        if ((s = checksum_entry(entries[i], &sum)) != LF_OK) /* reads every pixel */
            status = fail_lf("lf_entry_pin", s);
        int ok = s == LF_OK && sum == imgs[i]->checksum && !lf_entry_is_failed(entries[i]);
        printf("re-read %-52s checksum %016llx %s (%u decodes)\n", imgs[i]->path,
               (unsigned long long)sum, ok ? "ok" : "MISMATCH", atomic_load(&imgs[i]->decodes));
        good += ok;
        if (!ok)
            status = 1;
    }

    lf_stats st;
    if ((s = lf_cache_stats(cache, &st)) != LF_OK)
        return fail_lf("lf_cache_stats", s);
    printf("stats: entries %zu, bytes %zu, resident_bytes %zu, pinned_entries %zu, "
           "failed_entries %zu\n",
           st.entries, st.bytes, st.resident_bytes, st.pinned_entries, st.failed_entries);
    printf("stats: faults_handled %llu, pages_regenerated %llu, regenerate_calls %llu, "
           "regenerate_failures %llu, regenerate_time_ms %.1f\n",
           (unsigned long long)st.faults_handled, (unsigned long long)st.pages_regenerated,
           (unsigned long long)st.regenerate_calls, (unsigned long long)st.regenerate_failures,
           (double)st.regenerate_time_ns / 1e6);
    printf("stats: regenerate latency (<10us <100us <1ms <10ms <100ms <1s rest):");
    for (int b = 0; b < LF_LATENCY_BUCKETS; b++)
        printf(" %llu", (unsigned long long)st.regenerate_latency[b]);
    printf("\nstats: mode %s, uffd %s, kernel faults handled %s\n", mode_name(st.mode),
           st.uffd_kind, st.kernel_faults_handled ? "yes" : "no");
    if (lf_cache_fallback_reason(cache) != NULL)
        printf("stats: explicit mode because: %s\n", lf_cache_fallback_reason(cache));

    for (size_t i = 0; i < inserted; i++)
        lf_entry_release(entries[i]);
    lf_cache_free(cache);
    if ((size_t)atomic_load(&images_freed) != n) {
        fprintf(stderr, "png_cache: %d of %zu image contexts freed\n", atomic_load(&images_freed),
                n);
        status = 1;
    }
    free(imgs);
    free(entries);
    if (own_paths) {
        for (size_t i = 0; i < n; i++)
            free(paths[i]);
        free(paths);
    }
    printf("png_cache: %zu of %zu images intact after reclaim\n", good, n);
    return status;
}
