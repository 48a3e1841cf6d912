/* image_io.c: see image_io.h. PNG through libpng's simplified API (libpng >= 1.6). */
#include "image_io.h"

#include <errno.h>
#include <png.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int has_suffix(const char *path, const char *suffix) {
    size_t n = strlen(path), k = strlen(suffix);
    return n >= k && strcmp(path + n - k, suffix) == 0;
}

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

static int load_ppm(const char *path, image *img) {
    FILE *f = fopen(path, "rb");
    if (!f) return -1;
    unsigned long w, h, maxval;
    int ok = fgetc(f) == 'P' && fgetc(f) == '6' && ppm_number(f, &w) == 0 && ppm_number(f, &h) == 0 &&
             ppm_number(f, &maxval) == 0 && maxval == 255 && w > 0 && h > 0 && alloc_pixels(img, (uint32_t)w, (uint32_t)h, 3) == 0;
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

static int load_png(const char *path, image *img) {
    png_image png;
    memset(&png, 0, sizeof png);
    png.version = PNG_IMAGE_VERSION;
    if (!png_image_begin_read_from_file(&png, path)) return -1;
    png.format = PNG_FORMAT_RGB;
    if (alloc_pixels(img, png.width, png.height, 3) != 0) {
        png_image_free(&png);
        return -1;
    }
    if (!png_image_finish_read(&png, NULL, img->pixels, 0, NULL)) {
        image_free(img);
        return -1;
    }
    return 0;
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

int image_load(const char *path, image *img) {
    int rc = has_suffix(path, ".png") ? load_png(path, img) : has_suffix(path, ".ppm") ? load_ppm(path, img) : -1;
    if (rc) fprintf(stderr, "cannot read %s: need an existing 8-bit .png or binary .ppm (P6, maxval 255)\n", path);
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
