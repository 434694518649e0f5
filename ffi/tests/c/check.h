/*
 * The checks of the C unit tests (lazyfree_test.c, shared_test.c): each counts into `passed` or
 * `failed` and prints what failed with lf_last_error_message(); REQUIRE stops the run.
 * For one program each: the counters are the including file's.
 */
#ifndef LAZYFREE_TEST_CHECK_H
#define LAZYFREE_TEST_CHECK_H

#include <stdio.h>
#include <stdlib.h>

#include "lazyfree.h"

static int passed, failed;

#define CHECK(cond)                                                                    \
    do {                                                                               \
        if (cond) {                                                                    \
            passed++;                                                                  \
        } else {                                                                       \
            failed++;                                                                  \
            fprintf(stderr, "FAILED %s:%d: %s (last error: %s)\n", __FILE__, __LINE__, \
                    #cond, lf_last_error_message());                                  \
        }                                                                              \
    } while (0)

#define CHECK_STATUS(call, want)                                                           \
    do {                                                                                   \
        lf_status got_ = (call);                                                           \
        if (got_ == (want)) {                                                              \
            passed++;                                                                      \
        } else {                                                                           \
            failed++;                                                                      \
            fprintf(stderr, "FAILED %s:%d: %s gave %d (%s), want %s; last error: %s\n",    \
                    __FILE__, __LINE__, #call, (int)got_, lf_status_str(got_), #want,      \
                    lf_last_error_message());                                              \
        }                                                                                  \
    } while (0)

/* Stops the run at a failed precondition that later checks depend on. */
#define REQUIRE(cond)                                                                   \
    do {                                                                                \
        if (!(cond)) {                                                                  \
            fprintf(stderr, "FATAL %s:%d: %s (last error: %s)\n", __FILE__, __LINE__,   \
                    #cond, lf_last_error_message());                                    \
            exit(1);                                                                    \
        }                                                                               \
    } while (0)

/* A pointer value no function may write on failure. */
#define SENTINEL ((void *)0x5e57)

#endif
