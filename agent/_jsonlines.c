/* JSON lines of a fixed-length record table, written in one call a batch.
 *
 * agent/jsonlines.py describes each column (where its first value lies, the distance
 * between records, how to print it, and the JSON text that goes before it) and calls
 * format_lines() through ctypes. The values come from the wire as IPFIX put them
 * (big-endian), so nothing is converted first. polars' NDJSON writer did this at
 * some 40 ns a field; bench/collector.py measures both.
 *
 * Safe for any input: every kind has a bounded width (max_width), line_width() sums
 * them, the caller sizes `out` with it, and format_lines() checks it again as it writes.
 */
#include <arpa/inet.h>
#include <stdint.h>
#include <string.h>

enum kind {
	K_UNSIGNED = 0, /* big-endian, 1 to 8 octets */
	K_SIGNED = 1,   /* big-endian two's complement, 1 to 8 octets */
	K_NTP = 2,      /* dateTimeMicro/Nanoseconds: NTP seconds and fraction, as ns */
	K_IPV4 = 3,
	K_IPV6 = 4,
	K_MAC = 5,
	K_BOOLEAN = 6,  /* 1 is true, anything else false */
	K_STRING = 7,   /* a native uint32 index into `strings` (JSON text, quoted) */
	K_NONE = 8,     /* the prefix only */
	K_TEXT = 9,     /* octets printed as they are, quoted, trailing NULs (a fixed-length
			 * string's padding) left out: the caller checked that they need no
			 * escaping (printable ASCII, no quote or backslash, NULs only last) */
	K_HEX = 10,     /* octets as lowercase hex, quoted (octetArray, and any value
			 * JSON has no other form for) */
};

struct column {
	const uint8_t *data;  /* the first record's value */
	uint64_t stride;      /* octets from one record's value to the next (0: one value) */
	uint32_t kind;
	uint32_t length;      /* octets of the value */
	const char *prefix;   /* JSON before the value: `{"name":` or `,"name":`,
			       * padded to a multiple of 32 octets (put_text) */
	uint64_t prefix_len;
	const char *const *strings;  /* K_STRING, each padded as prefix is */
	const uint64_t *string_lens;
	uint64_t nstrings;
};

static const char DIGITS[] =
	"00010203040506070809101112131415161718192021222324252627282930313233343536373839"
	"40414243444546474849505152535455565758596061626364656667686970717273747576777879"
	"8081828384858687888990919293949596979899";

static unsigned digits(uint64_t v)
{
	unsigned n = 1;

	for (;;) {
		if (v < 10)
			return n;
		if (v < 100)
			return n + 1;
		if (v < 1000)
			return n + 2;
		if (v < 10000)
			return n + 3;
		v /= 10000;
		n += 4;
	}
}

/* Two digits a step, written from the end, which digits() found first. */
static char *put_u64(char *p, uint64_t v)
{
	char *e = p + digits(v), *b = e;

	while (v >= 100) {
		unsigned r = (unsigned)(v % 100);

		v /= 100;
		b -= 2;
		memcpy(b, DIGITS + 2 * r, 2);
	}
	if (v >= 10) {
		b -= 2;
		memcpy(b, DIGITS + 2 * v, 2);
	} else {
		*--b = (char)('0' + v);
	}
	return e;
}

/* "0." to "255.": each octet of a dotted quad with its dot, 4 octets an entry, and
 * its length: one lookup and one 4-octet copy an octet. */
static char DOTTED[256][4];
static uint8_t DOTTED_LEN[256];

__attribute__((constructor)) static void dotted_table(void)
{
	for (int i = 0; i < 256; i++) {
		char *p = DOTTED[i];

		if (i >= 100)
			*p++ = (char)('0' + i / 100);
		if (i >= 10)
			*p++ = (char)('0' + i / 10 % 10);
		*p++ = (char)('0' + i % 10);
		*p++ = '.';
		DOTTED_LEN[i] = (uint8_t)(p - DOTTED[i]);
	}
}

/* Copies len octets 32 at a time: constant-size copies the compiler inlines, where
 * a call to memcpy() a field cost more than the field. src is padded to a multiple
 * of 32 (the caller's padding) and out has SLACK octets past any line. */
#define SLACK 32
static char *put_text(char *p, const char *src, uint64_t len)
{
	for (uint64_t o = 0; o < len; o += 32)
		memcpy(p + o, src + o, 32);
	return p + len;
}

static char *put_i64(char *p, int64_t v)
{
	if (v < 0) {
		*p++ = '-';
		return put_u64(p, (uint64_t)0 - (uint64_t)v);
	}
	return put_u64(p, (uint64_t)v);
}

static uint64_t be(const uint8_t *d, uint32_t n)
{
	uint16_t v2;
	uint32_t v4;
	uint64_t v8, v = 0;

	switch (n) {  /* the common lengths without a loop */
	case 1:
		return d[0];
	case 2:
		memcpy(&v2, d, 2);
		return __builtin_bswap16(v2);
	case 4:
		memcpy(&v4, d, 4);
		return __builtin_bswap32(v4);
	case 8:
		memcpy(&v8, d, 8);
		return __builtin_bswap64(v8);
	}
	for (uint32_t i = 0; i < n; i++)
		v = v << 8 | d[i];
	return v;
}

static char *put_hex_byte(char *p, uint8_t b)
{
	static const char HEX[] = "0123456789abcdef";

	p[0] = HEX[b >> 4];
	p[1] = HEX[b & 15];
	return p + 2;
}

/* The most octets a value of this kind prints, quotes included. */
static uint64_t max_width(uint32_t kind)
{
	switch (kind) {
	case K_UNSIGNED: return 20;
	case K_SIGNED: case K_NTP: return 20;
	case K_IPV4: return 2 + 15;
	case K_IPV6: return 2 + INET6_ADDRSTRLEN;
	case K_MAC: return 2 + 17;
	case K_BOOLEAN: return 5;
	default: return 0;  /* K_STRING, K_TEXT, K_HEX: line_width() adds their length */
	}
}

/* Whether a value of this kind can be this long (what put() reads). */
static int fits(uint32_t kind, uint32_t length)
{
	switch (kind) {
	case K_UNSIGNED: case K_SIGNED: return length >= 1 && length <= 8;
	case K_NTP: return length == 8;
	case K_IPV4: case K_STRING: return length == 4;
	case K_IPV6: return length == 16;
	case K_MAC: return length == 6;
	case K_BOOLEAN: return length == 1;
	case K_NONE: return 1;
	case K_TEXT: case K_HEX: return length <= 65535;
	default: return 0;
	}
}

static char *put(char *p, const struct column *c, const uint8_t *d)
{
	switch (c->kind) {
	case K_UNSIGNED:
		return put_u64(p, be(d, c->length));
	case K_SIGNED: {
		uint64_t v = be(d, c->length);
		unsigned shift = 64 - 8 * c->length;

		/* sign-extend the reduced size */
		return put_i64(p, shift ? (int64_t)(v << shift) >> shift : (int64_t)v);
	}
	case K_NTP: {
		int64_t sec = (int64_t)be(d, 4) - 2208988800LL;
		uint64_t frac = be(d + 4, 4) * 1000000000ULL >> 32;

		return put_i64(p, sec * 1000000000LL + (int64_t)frac);
	}
	case K_IPV4:
		*p++ = '"';
		for (int i = 0; i < 4; i++) {
			memcpy(p, DOTTED[d[i]], 4);
			p += DOTTED_LEN[d[i]];
		}
		p[-1] = '"';  /* over the last dot */
		return p;
	case K_IPV6: {
		char text[INET6_ADDRSTRLEN];
		size_t n;

		if (!inet_ntop(AF_INET6, d, text, sizeof(text)))
			text[0] = 0;
		n = strlen(text);
		*p++ = '"';
		memcpy(p, text, n);
		p += n;
		*p++ = '"';
		return p;
	}
	case K_MAC:
		*p++ = '"';
		for (int i = 0; i < 6; i++) {
			if (i)
				*p++ = ':';
			p = put_hex_byte(p, d[i]);
		}
		*p++ = '"';
		return p;
	case K_BOOLEAN:
		if (d[0] == 1) {
			memcpy(p, "true", 4);
			return p + 4;
		}
		memcpy(p, "false", 5);
		return p + 5;
	case K_TEXT: {
		uint32_t n = c->length;

		while (n && !d[n - 1])
			n--;
		*p++ = '"';
		memcpy(p, d, n);
		p += n;
		*p++ = '"';
		return p;
	}
	case K_HEX:
		*p++ = '"';
		for (uint32_t i = 0; i < c->length; i++)
			p = put_hex_byte(p, d[i]);
		*p++ = '"';
		return p;
	case K_STRING: {
		uint32_t i;

		memcpy(&i, d, sizeof(i));
		if (i >= c->nstrings)
			i = 0;
		return put_text(p, c->strings[i], c->string_lens[i]);
	}
	default:
		return p;
	}
}

/* The most octets one line of these columns takes, SLACK included; 0 if a column's
 * kind cannot have its length. The caller sizes `out` with it, format_lines()
 * checks it again. */
uint64_t line_width(uint32_t ncols, const struct column *cols)
{
	uint64_t widest = 2 + SLACK;  /* `}` and the newline */

	for (uint32_t j = 0; j < ncols; j++) {
		const struct column *c = &cols[j];
		uint64_t w = max_width(c->kind);

		if (!fits(c->kind, c->length))
			return 0;
		if (c->kind == K_TEXT)
			w = 2 + c->length;
		if (c->kind == K_HEX)
			w = 2 + 2 * (uint64_t)c->length;
		for (uint64_t s = 0; c->kind == K_STRING && s < c->nstrings; s++)
			if (c->string_lens[s] > w)
				w = c->string_lens[s];
		widest += c->prefix_len + w;
	}
	return widest;
}

/* Writes the lines of records first to first + n - 1 (each closed by `}` and a
 * newline) into out. Returns the octets written, or -1 if `cap` would be passed or
 * a column's kind cannot have its length (the caller sized it wrong: nothing is
 * trusted to be right). */
int64_t format_lines(uint64_t first, uint64_t n, uint32_t ncols, const struct column *cols,
		     uint8_t *out, uint64_t cap)
{
	uint64_t widest = line_width(ncols, cols);
	char *p = (char *)out, *end = (char *)out + cap;

	if (!widest)
		return -1;
	for (uint64_t i = 0; i < n; i++) {
		if ((uint64_t)(end - p) < widest)
			return -1;
		for (uint32_t j = 0; j < ncols; j++) {
			const struct column *c = &cols[j];

			p = put_text(p, c->prefix, c->prefix_len);
			p = put(p, c, c->data + (first + i) * c->stride);
		}
		*p++ = '}';
		*p++ = '\n';
	}
	return p - (char *)out;
}
