/* image_io.c: see image_io.h. PNG through libpng's regular API (libpng >= 1.6). */
#define _DEFAULT_SOURCE /* strcasecmp */
#include "image_io.h"

#include <errno.h>
#include <png.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* Case-insensitive: Windows tools write FRAME.PNG. */
static bool has_suffix(const char *path, const char *suffix) {
    size_t n = strlen(path), k = strlen(suffix);
    return n >= k && strcasecmp(path + n - k, suffix) == 0;
}

bool image_name_ok(const char *path) { return has_suffix(path, ".png") || has_suffix(path, ".ppm"); }

static int alloc_pixels(image *img, uint32_t width, uint32_t height, uint32_t channels) {
    img->width = width, img->height = height, img->channels = channels;
    img->pixels = malloc((size_t)width * height * channels);
    return img->pixels ? 0 : -1;
}

void image_free(image *img) {
    free(img->pixels);
    img->pixels = NULL;
}

/* Reads the next header number of a PPM file, skipping white space and # comments. */
static int ppm_number(FILE *f, unsigned long *out) {
    int ch;
    while ((ch = fgetc(f)) == '#' || ch == ' ' || ch == '\t' || ch == '\n' || ch == '\r')
        if (ch == '#')
            while ((ch = fgetc(f)) != '\n' && ch != EOF) {}
    if (ch == EOF || ch < '0' || ch > '9') return -1;
    *out = 0;
    for (; ch >= '0' && ch <= '9'; ch = fgetc(f)) {
        *out = *out * 10 + (unsigned long)(ch - '0');
        if (*out > 65535) return -1;
    }
    return ch == ' ' || ch == '\t' || ch == '\n' || ch == '\r' ? 0 : -1; /* one white-space byte ends it */
}

/* The header of a binary PPM: its size, the file left at its first pixel. */
static bool ppm_header(FILE *f, unsigned long *w, unsigned long *h) {
    unsigned long maxval;
    return fgetc(f) == 'P' && fgetc(f) == '6' && ppm_number(f, w) == 0 && ppm_number(f, h) == 0 &&
           ppm_number(f, &maxval) == 0 && maxval == 255 && *w > 0 && *h > 0;
}

static int load_ppm(const char *path, image *img) {
    FILE *f = fopen(path, "rb");
    if (!f) return -1;
    unsigned long w, h;
    int ok = ppm_header(f, &w, &h) && alloc_pixels(img, (uint32_t)w, (uint32_t)h, 3) == 0;
    if (ok && fread(img->pixels, 1, (size_t)w * h * 3, f) != (size_t)w * h * 3) {
        image_free(img);
        ok = 0;
    }
    fclose(f);
    return ok ? 0 : -1;
}

static int save_ppm(const char *path, const image *img) {
    FILE *f = fopen(path, "wb");
    int ok = f != NULL && fprintf(f, "P6\n%u %u\n255\n", img->width, img->height) > 0;
    for (size_t i = 0; ok && i < (size_t)img->width * img->height; i++)
        ok = fwrite(img->pixels + i * img->channels, 1, 3, f) == 3;
    int saved_errno = errno;
    if (f && fclose(f) != 0 && ok) ok = 0, saved_errno = errno;
    if (!ok) fprintf(stderr, "cannot write %s: %s\n", path, strerror(saved_errno));
    return ok ? 0 : -1;
}

/* libpng's warnings are about ancillary chunks this reader ignores (colour profiles, text): not worth a word. */
static void png_quiet(png_structp png, png_const_charp message) { (void)png, (void)message; }

/* libpng's errors name the file and return to read_png's setjmp. */
static void png_failed(png_structp png, png_const_charp message) {
    fprintf(stderr, "%s: libpng: %s\n", (const char *)png_get_error_ptr(png), message);
    png_longjmp(png, 1);
}

/* 16-bit big-endian samples -> 8 bits in place, x * 255 / 65535 rounded: the rule of the project's Python tools
 * (upscaler_server/upscale.py, read_8bit), so both send the same frame. */
static void round_16_to_8(uint8_t *samples, size_t count) {
    for (size_t i = 0; i < count; i++) {
        uint32_t x = (uint32_t)samples[2 * i] << 8 | samples[2 * i + 1];
        samples[i] = (uint8_t)((x * 255 + 32767) / 65535);
    }
}

/* Decodes any PNG into RGB with the regular API: the simplified one blends alpha onto the (uninitialised) buffer
 * and applies gAMA and a linear-light reading of 16-bit samples, where a game's frames are sRGB-coded bytes to take
 * as they are. No png_set_gamma: the samples pass unchanged. Only *img outlives a longjmp, so nothing else changes
 * after setjmp but `rows`, which is volatile. */
static int read_png(png_structp png, png_infop info, FILE *f, image *img) {
    png_bytep *volatile rows = NULL;
    if (setjmp(png_jmpbuf(png))) {
        free(rows);
        image_free(img);
        return -1;
    }
    png_init_io(png, f);
    png_set_user_limits(png, 65535, 65535); /* the protocol's limit: refuse a huge header before allocating */
    png_read_info(png, info);
    png_set_expand(png);       /* palette -> RGB, grey of 1, 2, 4 bits -> 8, tRNS -> alpha (then stripped) */
    png_set_strip_alpha(png);  /* alpha is dropped, never blended: the daemon gets the colour channels */
    png_set_gray_to_rgb(png);
    png_set_interlace_handling(png);
    png_read_update_info(png, info);
    uint32_t width = png_get_image_width(png, info), height = png_get_image_height(png, info);
    size_t row_bytes = png_get_rowbytes(png, info);
    int depth = png_get_bit_depth(png, info);
    if (png_get_channels(png, info) != 3 || (depth != 8 && depth != 16)) png_error(png, "unexpected sample layout");
    img->width = width, img->height = height, img->channels = 3;
    img->pixels = malloc(row_bytes * height); /* 16-bit samples take twice the final size until rounded */
    rows = malloc(height * sizeof *rows);
    if (!img->pixels || !rows) png_error(png, "out of memory");
    for (uint32_t y = 0; y < height; y++) rows[y] = img->pixels + y * row_bytes;
    png_read_image(png, rows);
    png_read_end(png, NULL);
    if (depth == 16) round_16_to_8(img->pixels, (size_t)width * height * 3);
    free(rows);
    return 0;
}

static int load_png(const char *path, image *img) {
    FILE *f = fopen(path, "rb");
    if (!f) return -1;
    png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, (png_voidp)path, png_failed, png_quiet);
    png_infop info = png ? png_create_info_struct(png) : NULL;
    int rc = info ? read_png(png, info, f, img) : -1;
    png_destroy_read_struct(&png, &info, NULL);
    fclose(f);
    return rc;
}

static int save_png(const char *path, const image *img) {
    png_image png;
    memset(&png, 0, sizeof png);
    png.version = PNG_IMAGE_VERSION;
    png.width = img->width, png.height = img->height;
    png.format = img->channels == 4 ? PNG_FORMAT_RGBA : PNG_FORMAT_RGB;
    if (png_image_write_to_file(&png, path, 0, img->pixels, 0, NULL)) return 0;
    fprintf(stderr, "cannot write %s: %s\n", path, png.message); /* libpng says why: a missing folder, ... */
    return -1;
}

/* The IHDR of a PNG, read without decoding (libpng's errors return to the setjmp). */
static int png_size(png_structp png, png_infop info, FILE *f, uint32_t *width, uint32_t *height) {
    if (setjmp(png_jmpbuf(png))) return -1;
    png_init_io(png, f);
    png_set_user_limits(png, 65535, 65535);
    png_read_info(png, info);
    *width = png_get_image_width(png, info), *height = png_get_image_height(png, info);
    return 0;
}

int image_size(const char *path, uint32_t *width, uint32_t *height) {
    FILE *f = fopen(path, "rb");
    int rc = -1;
    if (f && has_suffix(path, ".png")) {
        png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, (png_voidp)path, png_failed, png_quiet);
        png_infop info = png ? png_create_info_struct(png) : NULL;
        rc = info ? png_size(png, info, f, width, height) : -1;
        png_destroy_read_struct(&png, &info, NULL);
    } else if (f && has_suffix(path, ".ppm")) {
        unsigned long w, h;
        if (ppm_header(f, &w, &h)) *width = (uint32_t)w, *height = (uint32_t)h, rc = 0;
    }
    if (f) fclose(f);
    if (rc) fprintf(stderr, "cannot read %s: need an existing .png or binary .ppm (P6, maxval 255)\n", path);
    return rc;
}

int image_load(const char *path, image *img) {
    int rc = has_suffix(path, ".png") ? load_png(path, img) : has_suffix(path, ".ppm") ? load_ppm(path, img) : -1;
    if (rc) fprintf(stderr, "cannot read %s: need an existing .png or binary .ppm (P6, maxval 255)\n", path);
    return rc;
}

int image_save(const char *path, const image *img) {
    if (has_suffix(path, ".png")) return save_png(path, img);
    if (has_suffix(path, ".ppm")) return save_ppm(path, img);
    fprintf(stderr, "cannot write %s: the name must end in .png or .ppm\n", path);
    return -1;
}

int image_pattern(uint32_t width, uint32_t height, uint32_t channels, image *img) {
    if (width == 0 || height == 0 || alloc_pixels(img, width, height, channels) != 0) return -1;
    for (uint32_t y = 0; y < height; y++) {
        for (uint32_t x = 0; x < width; x++) {
            uint8_t *p = img->pixels + ((size_t)y * width + x) * channels;
            p[0] = (uint8_t)(x * 255 / (width > 1 ? width - 1 : 1));
            p[1] = (uint8_t)(y * 255 / (height > 1 ? height - 1 : 1));
            p[2] = ((x / 4 + y / 4) & 1) ? 220 : 30;
            if (channels == 4) p[3] = (uint8_t)((x * 7 + y * 13) & 0xff);
        }
    }
    return 0;
}
