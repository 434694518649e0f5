/*
 * What the PNG examples (png_cache.c, png_shared.c) share: decoding a PNG, or the rows holding a
 * byte range of it, to 8-bit RGBA with libpng; a checksum; listing the PNG files of a directory.
 * Static functions for one program each; the including file defines _DEFAULT_SOURCE first.
 */
#ifndef LAZYFREE_EXAMPLES_PNG_DECODE_H
#define LAZYFREE_EXAMPLES_PNG_DECODE_H

#include <dirent.h>
#include <png.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Where the examples look for PNG files by default (Debian package sway-backgrounds). */
#define DEFAULT_DIR "/usr/share/backgrounds/sway"

/* ---- decoding ----------------------------------------------------------------------------- */

struct png_failure {
    char msg[256];
};

static void on_png_error(png_structp png, png_const_charp msg) {
    struct png_failure *f = png_get_error_ptr(png);
    snprintf(f->msg, sizeof f->msg, "%s", msg);
    png_longjmp(png, 1);
}

static void on_png_warning(png_structp png, png_const_charp msg) {
    (void)png;
    (void)msg;
}

/*
 * Decodes `path` as 8-bit RGBA and copies the bytes [offset, offset + len) of the image into
 * `out`, decoding rows only down to the last one needed (PNG rows can only be decoded in order).
 * With len 0 it reads just the header. Writes the size to *width and *height if not NULL.
 * Returns 0, or -1 with a message in err. Safe to call from several threads at once.
 */
static int decode(const char *path, size_t offset, uint8_t *out, size_t len, uint32_t *width,
                  uint32_t *height, char *err, size_t errlen) {
    FILE *volatile file = fopen(path, "rb");
    if (file == NULL) {
        snprintf(err, errlen, "%s: cannot open", path);
        return -1;
    }
    struct png_failure failure = {{0}};
    png_structp png =
        png_create_read_struct(PNG_LIBPNG_VER_STRING, &failure, on_png_error, on_png_warning);
    png_infop info = png ? png_create_info_struct(png) : NULL;
    uint8_t *volatile row = NULL;
    uint8_t *volatile whole = NULL;
    png_bytep *volatile rows = NULL;
    volatile int rc = -1;
    if (png == NULL || info == NULL) {
        snprintf(err, errlen, "%s: out of memory", path);
        goto done;
    }
    if (setjmp(png_jmpbuf(png))) {
        snprintf(err, errlen, "%s: %s", path, failure.msg);
        rc = -1;
        goto done;
    }
    png_init_io(png, file);
    png_read_info(png, info);
    png_uint_32 w = png_get_image_width(png, info), h = png_get_image_height(png, info);
    int type = png_get_color_type(png, info);
    png_set_expand(png);   /* palette to RGB, gray below 8 bits to 8, tRNS to alpha */
    png_set_strip_16(png); /* 16-bit channels to 8 */
    png_set_gray_to_rgb(png);
    if (!(type & PNG_COLOR_MASK_ALPHA) && !png_get_valid(png, info, PNG_INFO_tRNS))
        png_set_filler(png, 0xff, PNG_FILLER_AFTER);
    int passes = png_set_interlace_handling(png);
    png_read_update_info(png, info);
    size_t stride = (size_t)w * 4;
    if (png_get_rowbytes(png, info) != stride) {
        snprintf(err, errlen, "%s: unexpected row size after conversion to RGBA", path);
        goto done;
    }
    if (width)
        *width = w;
    if (height)
        *height = h;
    if (len == 0) {
        rc = 0;
        goto done;
    }
    if (offset + len > stride * h) {
        snprintf(err, errlen, "%s: range %zu+%zu past the image", path, offset, len);
        goto done;
    }
    size_t first = offset / stride, last = (offset + len - 1) / stride;
    if (passes == 1) {
        row = malloc(stride);
        if (row == NULL) {
            snprintf(err, errlen, "%s: out of memory", path);
            goto done;
        }
        for (size_t y = 0; y <= last; y++) {
            png_read_row(png, row, NULL);
            if (y < first)
                continue; /* decoded only to reach the rows asked for */
            size_t lo = y * stride > offset ? y * stride : offset;
            size_t hi = (y + 1) * stride < offset + len ? (y + 1) * stride : offset + len;
            memcpy(out + (lo - offset), row + (lo - y * stride), hi - lo);
        }
    } else {
        /* Interlaced: every pass touches every row, so the whole image is decoded. */
        whole = malloc(stride * h);
        rows = malloc(h * sizeof *rows);
        if (whole == NULL || rows == NULL) {
            snprintf(err, errlen, "%s: out of memory", path);
            goto done;
        }
        for (size_t y = 0; y < h; y++)
            rows[y] = whole + y * stride;
        png_read_image(png, rows);
        memcpy(out, whole + offset, len);
    }
    rc = 0;
done:
    png_destroy_read_struct(png ? &png : NULL, info ? &info : NULL, NULL);
    free(row);
    free(whole);
    free(rows);
    fclose(file);
    return rc;
}

static uint64_t fnv1a(const uint8_t *p, size_t n) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++)
        h = (h ^ p[i]) * 0x100000001b3ull;
    return h;
}

/* ---- files -------------------------------------------------------------------------------- */

static int by_name(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* The PNG files of `dir`, sorted; NULL-terminated. */
static char **pngs_in(const char *dir, size_t *count) {
    DIR *d = opendir(dir);
    if (d == NULL)
        return NULL;
    size_t n = 0, cap = 16;
    char **paths = malloc(cap * sizeof *paths);
    struct dirent *de;
    while (paths != NULL && (de = readdir(d)) != NULL) {
        size_t l = strlen(de->d_name);
        if (l < 4 || strcmp(de->d_name + l - 4, ".png") != 0)
            continue;
        if (n + 1 == cap) {
            char **more = realloc(paths, (cap *= 2) * sizeof *paths);
            if (more == NULL) {
                free(paths);
                paths = NULL;
                break;
            }
            paths = more;
        }
        size_t pl = strlen(dir) + 1 + l + 1;
        paths[n] = malloc(pl);
        if (paths[n] == NULL)
            break;
        snprintf(paths[n], pl, "%s/%s", dir, de->d_name);
        n++;
    }
    closedir(d);
    if (paths == NULL)
        return NULL;
    qsort(paths, n, sizeof *paths, by_name);
    paths[n] = NULL;
    *count = n;
    return paths;
}

#endif
