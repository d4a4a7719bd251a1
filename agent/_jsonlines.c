/* The collector's C: JSON lines of a fixed-length record table, written in one call
 * a batch (format_lines); where the records of a set with variable-length fields end
 * (scan_records, for the decoder); and JSON lines of such records, read from the wire
 * one by one (format_records). agent/native.py loads it.
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

/* ---- Where the records of a set with variable-length fields end ----------------
 *
 * The decoder's scan of such a set (agent/ipfix/decoder.py _scan): each record's end,
 * its strings' lengths, and whether they are those of the record before (a run goes
 * on). steps: the fixed octets before each of the nvar variable-length fields and
 * after the last.
 */

enum scan_error { SCAN_VARLEN = 1, SCAN_FIELD = 2 };
enum run { RUN_STARTS = 0, RUN_GOES_ON = 1, RUN_NONE = 2 /* a length in the three-octet
	form: the layouts of runs have one-octet lengths; this record is read alone */ };

/* Records from the set's start while `minimum` octets are left (the rest is padding);
 * returns how many, or -1 with *error for a record cut short. ends, run: a slot a
 * record; lengths: nvar slots a record; at most max records. */
int64_t scan_records(const uint8_t *data, uint64_t len, const uint32_t *steps, uint32_t nvar,
		     uint64_t minimum, uint32_t *ends, uint8_t *run, uint16_t *lengths,
		     uint64_t max, uint32_t *error)
{
	uint64_t off = 0, n = 0;

	while (len - off >= minimum && n < max) {
		uint16_t *these = lengths + n * nvar;
		uint8_t state = RUN_STARTS;

		for (uint32_t v = 0; v < nvar; v++) {
			uint64_t m;

			off += steps[v];
			if (off >= len) {
				*error = off > len ? SCAN_FIELD : SCAN_VARLEN;
				return -1;
			}
			m = data[off++];
			if (m == 255) {
				if (off + 2 > len) {
					*error = SCAN_VARLEN;
					return -1;
				}
				m = (uint64_t)data[off] << 8 | data[off + 1];
				off += 2;
				state = RUN_NONE;
			}
			these[v] = (uint16_t)m;
			off += m;
		}
		off += steps[nvar];
		if (off > len) {
			*error = SCAN_FIELD;
			return -1;
		}
		if (state == RUN_STARTS && n && run[n - 1] != RUN_NONE &&
		    !memcmp(these, these - nvar, nvar * sizeof(*these)))
			state = RUN_GOES_ON;
		ends[n] = (uint32_t)off;
		run[n++] = state;
	}
	return (int64_t)n;
}

/* ---- Records with variable-length fields, read from the wire one by one ----------
 *
 * An exporter that does not group its records by their strings' lengths (pod names
 * of many lengths) sends sets no fixed layout fits. format_records() walks such a set
 * record by record and writes each record's line as the decoder's record-by-record
 * reading and json.dumps() write it (agent/jsonlines.py: the same octets, tested).
 * A value it does not print (a float, an integer over 8 octets, a string with an
 * octet over 0x7F) stops it before that record, for Python to write that one.
 */

enum class_ {  /* a field's type, as value() tells them apart */
	C_UNSIGNED = 0, /* unsigned*, dateTimeSeconds, dateTimeMilliseconds */
	C_SIGNED = 1,
	C_NTP = 2,      /* dateTimeMicroseconds, dateTimeNanoseconds */
	C_IPV4 = 3,
	C_IPV6 = 4,
	C_MAC = 5,
	C_BOOLEAN = 6,
	C_STRING = 7,
	C_FLOAT64 = 8,  /* value() reads 8 and 4 octets as a float */
	C_FLOAT32 = 9,  /* 4 octets */
	C_OCTETS = 10,  /* anything else: hex */
};

#define VARLEN 65535
#define MAX_FIELDS 512
#define K_ZERO 100    /* an integer of 0 octets: 0 */
#define K_JSON 101    /* a string as json.dumps() writes it (ASCII: \u escapes) */
#define K_PYTHON 102  /* a value this file does not print */
#define KEY_WIDTH 40  /* a flow key's slot: its length, then up to 37 octets */

struct vfield {
	uint32_t cls;        /* enum class_ */
	uint32_t length;     /* octets, or VARLEN */
	const char *prefix;  /* `,"name":` as json.dumps() writes the name, padded (put_text) */
	uint64_t prefix_len;
};

enum status { S_END = 0, S_FULL = 1, S_PYTHON = 2, S_MALFORMED = 3 };

/* How value() gives a value of this class and length. */
static uint32_t kind_of(uint32_t cls, uint32_t n)
{
	switch (cls) {
	case C_UNSIGNED: return n == 0 ? K_ZERO : n <= 8 ? K_UNSIGNED : K_PYTHON;
	case C_SIGNED: return n == 0 ? K_ZERO : n <= 8 ? K_SIGNED : K_PYTHON;
	case C_NTP: return n == 8 ? K_NTP : K_HEX;
	case C_IPV4: return n == 4 ? K_IPV4 : K_HEX;
	case C_IPV6: return n == 16 ? K_IPV6 : K_HEX;
	case C_MAC: return n == 6 ? K_MAC : K_HEX;
	case C_BOOLEAN: return n == 1 ? K_BOOLEAN : K_HEX;
	case C_STRING: return K_JSON;
	case C_FLOAT64: return n == 8 || n == 4 ? K_PYTHON : K_HEX;
	case C_FLOAT32: return n == 4 ? K_PYTHON : K_HEX;
	default: return K_HEX;
	}
}

/* A string's octets less its trailing NULs (value() strips them), or -1 if one is
 * over 0x7F (UTF-8 that Python decodes and escapes: left to it). */
static int64_t json_length(const uint8_t *d, uint32_t n)
{
	while (n && !d[n - 1])
		n--;
	for (uint32_t i = 0; i < n; i++)
		if (d[i] > 0x7F)
			return -1;
	return n;
}

/* ASCII as json.dumps() escapes it: quote, backslash, \b \f \n \r \t by name, other
 * octets outside space to tilde as \u00XX. */
static char *put_json(char *p, const uint8_t *d, uint32_t n)
{
	static const char HEX[] = "0123456789abcdef";

	*p++ = '"';
	for (uint32_t i = 0; i < n; i++) {
		uint8_t b = d[i];

		if (b >= 0x20 && b <= 0x7E && b != '"' && b != '\\') {
			*p++ = (char)b;
			continue;
		}
		*p++ = '\\';
		switch (b) {
		case '"': *p++ = '"'; break;
		case '\\': *p++ = '\\'; break;
		case '\b': *p++ = 'b'; break;
		case '\f': *p++ = 'f'; break;
		case '\n': *p++ = 'n'; break;
		case '\r': *p++ = 'r'; break;
		case '\t': *p++ = 't'; break;
		default:
			memcpy(p, "u00", 3);
			p[3] = HEX[b >> 4];
			p[4] = HEX[b & 15];
			p += 5;
		}
	}
	*p++ = '"';
	return p;
}

/* An unsigned value of up to 8 octets, or -1 past them (the caller's bound). */
static int64_t small(const uint8_t *d, uint32_t n, uint64_t below)
{
	uint64_t v = n ? be(d, n) : 0;

	return v < below ? (int64_t)v : -1;
}

/* The flow key of jsonlines.flow_key(): protocol, then the two endpoints (address and
 * port), the smaller first; 0 octets (None) where an address is not of `size`. */
static uint8_t put_key(uint8_t *slot, const int32_t *key, uint32_t size,
		       const uint32_t *at, const uint32_t *len, const uint8_t *d)
{
	uint8_t a[18], b[18];
	int64_t proto = 0, sport = 0, dport = 0;

	if (len[key[0]] != size || len[key[1]] != size)
		return slot[0] = 0;
	if (key[4] >= 0 && (proto = small(d + at[key[4]], len[key[4]], 256)) < 0)
		proto = 0;
	if (key[2] >= 0 && (sport = small(d + at[key[2]], len[key[2]], 65536)) < 0)
		sport = 0;
	if (key[3] >= 0 && (dport = small(d + at[key[3]], len[key[3]], 65536)) < 0)
		dport = 0;
	memcpy(a, d + at[key[0]], size);
	memcpy(b, d + at[key[1]], size);
	a[size] = (uint8_t)(sport >> 8), a[size + 1] = (uint8_t)sport;
	b[size] = (uint8_t)(dport >> 8), b[size + 1] = (uint8_t)dport;
	slot[1] = (uint8_t)proto;
	if (memcmp(a, b, size + 2) <= 0) {
		memcpy(slot + 2, a, size + 2);
		memcpy(slot + 4 + size, b, size + 2);
	} else {
		memcpy(slot + 2, b, size + 2);
		memcpy(slot + 4 + size, a, size + 2);
	}
	return slot[0] = (uint8_t)(1 + 2 * (size + 2));
}

/* Lines of the records in data from *pos on, each `meta` (`{"@exporter":...` up to
 * the last key's value, padded as a prefix) then the fields, into out (cap octets);
 * with key (source and destination address, source and destination port, protocol:
 * field indices, -1 where absent, key_size 4 or 16), each record's flow key into
 * keys, KEY_WIDTH octets a record. At most max_records. Returns the records written;
 * *pos is past them, *written the octets, *status why it stopped: S_END, S_FULL (out
 * has no room for the next record: *written then the octets it needs if none was
 * written), S_PYTHON (the record at *pos has a value for Python to write),
 * S_MALFORMED (a record cut short: the decoder hands whole records only). */
int64_t format_records(const uint8_t *data, uint64_t len, uint64_t *pos, uint32_t nfields,
		       const struct vfield *fields, const char *meta, uint64_t meta_len,
		       uint8_t *out, uint64_t cap, uint64_t *written, const int32_t *key,
		       uint32_t key_size, uint8_t *keys, uint64_t max_records, uint32_t *status)
{
	uint32_t at[MAX_FIELDS], n[MAX_FIELDS], kind[MAX_FIELDS];
	char *p = (char *)out;
	uint64_t done = 0, off = *pos;

	*status = S_END;
	if (nfields > MAX_FIELDS)
		return *status = S_MALFORMED, 0;
	while (off < len && done < max_records) {
		uint64_t o = off, width = meta_len + 2 + SLACK;

		for (uint32_t j = 0; j < nfields; j++) {
			uint64_t m = fields[j].length;

			if (m == VARLEN) {
				if (o >= len)
					goto malformed;
				m = data[o++];
				if (m == 255) {
					if (o + 2 > len)
						goto malformed;
					m = (uint64_t)data[o] << 8 | data[o + 1];
					o += 2;
				}
			}
			if (o + m > len)
				goto malformed;
			at[j] = (uint32_t)o, n[j] = (uint32_t)m;
			kind[j] = kind_of(fields[j].cls, (uint32_t)m);
			if (kind[j] == K_JSON) {
				int64_t t = json_length(data + o, (uint32_t)m);

				if (t < 0)
					kind[j] = K_PYTHON;
				else
					n[j] = (uint32_t)t, width += 6 * (uint64_t)t;
			} else if (kind[j] == K_HEX) {
				width += 2 * m;
			}
			if (kind[j] == K_PYTHON) {
				*status = S_PYTHON;
				goto stop;
			}
			width += fields[j].prefix_len + 2 + 46;  /* quotes, the widest fixed kind */
			o += m;
		}
		if ((uint64_t)((char *)out + cap - p) < width) {
			*status = S_FULL;
			if (!done)
				p = (char *)out + width;  /* what the caller must give */
			goto stop;
		}
		p = put_text(p, meta, meta_len);
		for (uint32_t j = 0; j < nfields; j++) {
			const uint8_t *d = data + at[j];
			struct column c = { .kind = kind[j], .length = n[j] };

			p = put_text(p, fields[j].prefix, fields[j].prefix_len);
			if (kind[j] == K_ZERO)
				*p++ = '0';
			else if (kind[j] == K_JSON)
				p = put_json(p, d, n[j]);
			else
				p = put(p, &c, d);
		}
		*p++ = '}';
		*p++ = '\n';
		if (key_size)
			put_key(keys + done * KEY_WIDTH, key, key_size, at, n, data);
		done++;
		off = o;
	}
	if (off < len && done == max_records)
		*status = S_FULL;
stop:
	*pos = off;
	*written = (uint64_t)(p - (char *)out);
	return (int64_t)done;
malformed:
	*status = S_MALFORMED;
	goto stop;
}
